"""`python -m pipeline COMMAND`: score and check submissions; run the stages in parallel or on SLURM;
freeze a pseudo-label teacher; write a complete params file from an overlay; export the ensemble as an
offline bundle and predict from one."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.atomic import atomic_path, write_json, write_text
from pipeline.bundle.export import PredictInputs, export_bundle
from pipeline.bundle.predict import ENGINES, predict_bundle
from pipeline.config import (
    Params,
    complete,
    load_params,
    overlay_of,
    params_from_dict,
    params_from_overlay,
    read_yaml,
    render_params,
)
from pipeline.data import coco, records
from pipeline.data.probstore import read_probabilities
from pipeline.data.pseudo import TEACHER_FILE
from pipeline.errors import UserError
from pipeline.evaluation.rle import ORDERS
from pipeline.evaluation.sidecar import read_sidecar, resolve_encoding
from pipeline.evaluation.submission import check_submission, score_submission
from pipeline.metrics import AVERAGES
from pipeline.orchestration.parallel import parse_devices, plan_stages, read_graph, run_parallel, stale_stages
from pipeline.orchestration.slurm import SlurmOptions, run_on_node, stage_command, submit_script
from pipeline.training.runtime import cpu_cores, node_rank

# `validate` prints at most this many problems, then how many more there are.
MAX_PRINTED_PROBLEMS = 50
NATIVE = "native"
# --size's default, told apart from an explicit "native" (None); not a string, so argparse leaves it be.
_SIZE_FROM_PARAMS = object()


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: sys.argv) and run the chosen command; run it under `errors.run_main`."""
    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser("score", help="mIoU of a submission against COCO ground truth")
    score.add_argument("submission", type=Path, help="submission CSV (rle or dense; read from its header)")
    score.add_argument(
        "--truth", type=Path, required=True, help="COCO json with the test images' annotations"
    )
    score.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    score.add_argument(
        "--average",
        choices=AVERAGES,
        help="mIoU over the whole set (dataset) or per image, then averaged (image); default: metric.average",
    )
    _add_common(score)

    validate = commands.add_parser("validate", help="check a submission's format against the test images")
    validate.add_argument("submission", type=Path, help="submission CSV (rle or dense; read from its header)")
    validate.add_argument("--test", type=Path, required=True, help="COCO json listing the test images")
    _add_common(validate)

    parallel = commands.add_parser(
        "parallel", help="dvc repro, with the train and oof stages N at a time, one per device"
    )
    parallel.add_argument(
        "--devices",
        required=True,
        help="GPU indices (0,1,2,3) or CPU slots (cpu,cpu): each runs one stage at a time",
    )
    parallel.add_argument(
        "--threads", type=int, help="OpenMP threads per stage; default: the machine's cores shared out"
    )
    parallel.add_argument(
        "--logs", type=Path, default=Path("logs/stages"), help="folder of one log file per stage"
    )

    slurm = commands.add_parser(
        "slurm", help="submit one SLURM job per out-of-date train/oof stage, then one for the rest"
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the submission script, submit nothing")
    slurm.add_argument("--time", default=SlurmOptions.time, help="each job's time limit (sbatch --time)")
    slurm.add_argument("--cpus-per-task", type=int, default=SlurmOptions.cpus_per_task)
    slurm.add_argument("--partition", help="sbatch --partition; default: the cluster's")
    slurm.add_argument("--account", help="sbatch --account; default: the cluster's")
    slurm.add_argument("--logs", type=Path, default=SlurmOptions.log_dir, help="folder of the jobs' logs")

    node = commands.add_parser(
        "node", help="one node's part of a multi-node train stage (under srun; see README)"
    )
    node.add_argument("stage", help="e.g. train@unet-0")

    params = commands.add_parser(
        "params", help="write a complete params file: an overlay (only what differs) over the defaults"
    )
    params.add_argument("overlay", type=Path, help="e.g. configs/trash.yaml")
    params.add_argument(
        "--out", type=Path, default=Path("params.yaml"), help="where to write it (default: %(default)s)"
    )

    teacher = commands.add_parser(
        "teacher", help="freeze the predict stage's test probabilities as the pseudo-label teacher"
    )
    teacher.add_argument(
        "--predictions",
        type=Path,
        default=Path("predictions/test.npz"),
        help="the predict stage's probabilities (default: %(default)s, as dvc.yaml writes them)",
    )
    teacher.add_argument(
        "--out",
        type=Path,
        default=Path("teacher") / TEACHER_FILE,
        help="where the pseudo stage reads the teacher (default: %(default)s)",
    )
    export = commands.add_parser(
        "export", help="pack the fitted ensemble into an offline bundle: a folder and a zip of it"
    )
    export.add_argument("out", type=Path, help="bundle folder to write; OUT.zip is written beside it")
    export.add_argument(
        "--onnx", action="store_true", help="also each model as ONNX (predict-bundle --engine onnx)"
    )

    bundle = commands.add_parser(
        "predict-bundle", help="a submission from an exported bundle: no DVC, no workspace, no params"
    )
    bundle.add_argument("bundle", type=Path, help="the bundle folder or its zip")
    bundle.add_argument(
        "images", type=Path, help="a COCO json listing the test images, or a folder of images"
    )
    bundle.add_argument("out", type=Path, help="submission CSV to write (its sidecar NAME.json beside it)")
    bundle.add_argument("--root", type=Path, help="a test json's images are read from ROOT/file_name "
                        "(default: the json's folder)")  # fmt: skip
    bundle.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="stop, writing nothing, once the projected total (printed after the first batch) exceeds it",
    )
    bundle.add_argument(
        "--engine", choices=ENGINES, default="torch", help="onnx: onnxruntime on the CPU (export --onnx)"
    )
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train-json",
        type=Path,
        help="training COCO json, which decides the classes; needed with data.unused_categories: drop",
    )
    parser.add_argument(
        "--size",
        type=_parse_size,
        default=_SIZE_FROM_PARAMS,
        help=f"mask size N (N x N) or '{NATIVE}' (each image's own size); default: submission.size",
    )
    parser.add_argument(
        "--order",
        choices=ORDERS,
        help="RLE pixel order; default: the submission's sidecar (NAME.json beside it, written by predict), "
        "else submission.rle_order",
    )
    parser.add_argument(
        "--params",
        type=Path,
        help="params file for the defaults (submission.size, submission.rle_order, data.overlap, "
        "data.unused_categories); "
        "default: ./params.yaml if it exists, else the built-in defaults",
    )


def score(args: argparse.Namespace) -> None:
    """Print mIoU and a per-class IoU table; write them to --json if asked."""
    params = _load_params(args.params)
    order, size = _encoding(args, params)
    truth = _load_with_classes(args.truth, args.train_json, params)
    if not truth.has_annotations:
        raise UserError(f"{args.truth}: no annotations; --truth must be the test set's ground truth")
    average = args.average or params.metric.average
    result = score_submission(args.submission, truth, size, params.data.overlap, order=order, average=average)
    absent = sum(math.isnan(v) for v in result["iou"].values())
    classes = f"{len(result['iou']) - absent} classes ({absent} absent)"
    print(f"mIoU {result['miou']:.4f} ({average} average) over {classes}")
    width = max(len(name) for name in result["iou"])
    print(f"{'class':<{width}}  IoU")
    for name, value in result["iou"].items():
        print(f"{name:<{width}}  {'absent' if math.isnan(value) else f'{value:.4f}'}")
    if args.json is not None:
        write_json(args.json, {"size": size, **result})


def validate(args: argparse.Namespace) -> None:
    """Print "valid: N rows" (exit 0), or one line per problem and exit 1."""
    params = _load_params(args.params)
    _, size = _encoding(args, params)
    test = _load_with_classes(args.test, args.train_json, params)
    report = check_submission(args.submission, test, size)
    recorded = read_sidecar(args.submission)
    if recorded is not None and report.fmt is not None and recorded["format"] != report.fmt:
        report.problems.insert(
            0, f"the sidecar says format {recorded['format']}, the header is {report.fmt}'s"
        )
    if not report.problems:
        print(f"valid: {report.n_rows} rows ({report.fmt}, {len(test.images)} images)")
        return
    for line in report.problems[:MAX_PRINTED_PROBLEMS]:
        print(line)
    hidden = len(report.problems) - MAX_PRINTED_PROBLEMS
    if hidden > 0:
        print(f"... and {hidden} more problems")
    print(f"invalid: {len(report.problems)} problems in {args.submission}")
    raise SystemExit(1)


def parallel(args: argparse.Namespace) -> None:
    """`pipeline.orchestration.parallel.run_parallel` in the current DVC project; exits with its code."""
    root = _dvc_root("parallel")
    runtime = _load_params(None).runtime
    if runtime.nproc > 1 or runtime.nnodes > 1:
        # Each stage sees one device here; DDP over several would find only the first.
        raise UserError(
            f"params: runtime.nproc is {runtime.nproc} and runtime.nnodes {runtime.nnodes}; "
            "`parallel` gives each stage one device: set both to 1, or run `dvc repro` for DDP"
        )
    devices = parse_devices(args.devices, args.threads, cpu_cores())
    code = run_parallel(root, devices, args.logs)
    if code != 0:
        raise SystemExit(code)


def slurm(args: argparse.Namespace) -> None:
    """Print (--dry-run) or run the script that submits the project's out-of-date stages as SLURM jobs."""
    root = _dvc_root("slurm")
    params = _load_params(None)
    plan = plan_stages(read_graph(root))
    environ = dict(os.environ)
    before_stale = bool(stale_stages(root, plan.before, environ, sys.stderr))
    stale = set() if before_stale else stale_stages(root, list(plan.jobs), environ, sys.stderr)
    options = SlurmOptions(args.time, args.cpus_per_task, args.partition, args.account, args.logs)
    script = submit_script(root, plan, stale, before_stale, params.runtime, options)
    if args.dry_run:
        print(script, end="")
        return
    if shutil.which("sbatch") is None:
        raise UserError("sbatch: not found; run this on the cluster's login node, or use --dry-run")
    path = args.logs / "submit.sh"
    write_text(path, script)
    code = subprocess.call(["bash", str(path)], cwd=root)
    if code != 0:
        raise SystemExit(code)


def node(args: argparse.Namespace) -> None:
    """`slurm.run_on_node` for this node's rank (TRASHSEG_NODE_RANK, else srun's SLURM_NODEID)."""
    root = _dvc_root("node")
    rank = node_rank(_load_params(None).runtime.nnodes, os.environ)
    code = run_on_node(root, args.stage, rank)
    if code != 0:
        raise SystemExit(code)


def teacher(args: argparse.Namespace) -> None:
    """Copy --predictions to --out (atomically) once every image's probabilities read back."""
    stored = read_probabilities(args.predictions, "test probabilities", "run dvc repro first")
    for index in range(len(stored)):
        stored.probabilities(index)  # a UserError naming the file if one is corrupt: never freeze it
    with atomic_path(args.out) as tmp:
        shutil.copyfile(args.predictions, tmp)
    print(
        f"froze {args.predictions} as {args.out}: {len(stored)} test images, {len(stored.classes)} "
        f"classes ({', '.join(stored.classes)}); pseudo.enabled: true in params.yaml uses it"
    )


def export(args: argparse.Namespace) -> None:
    """Bundle what the predict stage reads, found in dvc.yaml's predict command."""
    inputs = _predict_inputs(_dvc_root("export"))
    exported = export_bundle(inputs, args.out, args.onnx)
    left_out = f"; left out (zero weight): {', '.join(exported.left_out)}" if exported.left_out else ""
    print(
        f"wrote {exported.folder} and {exported.zip}: {', '.join(exported.members)} "
        f"({exported.checkpoints} checkpoints{f', {exported.graphs} ONNX graphs' if exported.graphs else ''})"
        f"{left_out}"
    )
    print(
        f"predict with it anywhere: python -m pipeline predict-bundle {exported.zip} TEST_JSON_OR_DIR OUT.csv"
    )


def predict_bundle_command(args: argparse.Namespace) -> None:
    if args.time_limit is not None and args.time_limit <= 0:
        raise UserError(f"--time-limit must be positive, got {args.time_limit:g}")
    done = predict_bundle(args.bundle, args.images, args.out, args.root, args.time_limit, engine=args.engine)
    print(
        f"wrote {done.out}: {done.images} images, {done.rows} rows in {done.seconds:.1f} s; "
        f"how it is encoded: {done.sidecar}"
    )


def _predict_inputs(root: Path) -> PredictInputs:
    """The predict stage's --models, --weights, --manifest, --refits and --params, as dvc.yaml has them."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--models", "--weights", "--manifest", "--refits"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    command = shlex.split(stage_command(root, "predict"))
    try:
        flags, _ = parser.parse_known_args(command[command.index("stages/predict.py") + 1 :])
    except (ValueError, SystemExit):
        raise UserError(f"{root / 'dvc.yaml'}: the predict stage's command is not `python stages/predict.py "
                        "--models M --weights W --manifest F --refits R ...`") from None  # fmt: skip
    return PredictInputs(
        *(root / value for value in (flags.models, flags.weights, flags.manifest, flags.params, flags.refits))
    )


def _dvc_root(command: str) -> Path:
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        raise UserError(f"{root}: no dvc.yaml here; run `python -m pipeline {command}` in the project's root")
    return root


# Explicit registry: subcommand name -> handler.
def write_params(args: argparse.Namespace) -> None:
    """Write the overlay completed with every default, checked, commented from the fields' descriptions."""
    overlay = read_yaml(args.overlay) or {}
    full = complete(overlay)
    params_from_dict(full, source=str(args.overlay))
    leading = []
    for line in args.overlay.read_text().splitlines():
        if not line.startswith("#"):
            break
        leading.append(line.removeprefix("#").removeprefix(" "))
    header = [
        *leading,
        f"Written by `python -m pipeline params {args.overlay.as_posix()}`: that overlay over the",
        "defaults in pipeline/config.py, every key spelled out. Edit the overlay and write this file again.",
    ]
    write_text(args.out, render_params(full, header))
    changed = sum(len(v) if k != "models" else 1 for k, v in overlay_of(full).items())
    print(f"wrote {args.out}: {changed} settings from {args.overlay}, the rest defaults")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "score": score,
    "validate": validate,
    "parallel": parallel,
    "slurm": slurm,
    "node": node,
    "teacher": teacher,
    "params": write_params,
    "export": export,
    "predict-bundle": predict_bundle_command,
}


def _parse_size(text: str) -> int | None:
    if text == NATIVE:
        return None
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or '{NATIVE}', got {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or '{NATIVE}', got {text!r}")
    return size


def _load_params(path: Path | None) -> Params:
    """The named params file; without one, ./params.yaml if present, else the built-in defaults."""
    if path is not None:
        return load_params(path)
    default = Path("params.yaml")
    return load_params(default) if default.is_file() else params_from_overlay({})


def _load_with_classes(path: Path, train_json: Path | None, params: Params) -> records.CocoSet:
    data = params.data
    return coco.load_with_training_classes(
        path, train_json, on_bad=data.on_bad_annotation, unused=data.unused_categories
    )


def _encoding(args: argparse.Namespace, params: Params) -> tuple[str, int | None]:
    """(RLE order, size) to read the submission with: its sidecar's, checked against what was asked."""
    size_given = args.size is not _SIZE_FROM_PARAMS
    size = _resolve_size(args.size, params)
    return resolve_encoding(
        args.submission, args.order, size, params.submission.rle_order, size_given=size_given
    )


def _resolve_size(size: object, params: Params) -> int | None:
    if size is _SIZE_FROM_PARAMS:
        return params.submission.size
    assert size is None or isinstance(size, int)
    return size
