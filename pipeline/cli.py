"""`python -m pipeline score|validate`: check and score submission CSVs from the command line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from pipeline import coco
from pipeline.atomic import write_json
from pipeline.config import Params, load_params
from pipeline.errors import UserError
from pipeline.submission import check_submission, score_submission

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
    _add_common(score)

    validate = commands.add_parser("validate", help="check a submission's format against the test images")
    validate.add_argument("submission", type=Path, help="submission CSV (rle or dense; read from its header)")
    validate.add_argument("--test", type=Path, required=True, help="COCO json listing the test images")
    _add_common(validate)
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
        "--params",
        type=Path,
        help="params file for the defaults (submission.size, submission.rle_order, data.overlap, "
        "data.unused_categories); "
        "default: ./params.yaml if it exists, else the built-in defaults",
    )


def score(args: argparse.Namespace) -> None:
    """Print mIoU and a per-class IoU table; write them to --json if asked."""
    params = _load_params(args.params)
    size = _resolve_size(args.size, params)
    truth = _load_with_classes(args.truth, args.train_json, params)
    if not truth.has_annotations:
        raise UserError(f"{args.truth}: no annotations; --truth must be the test set's ground truth")
    result = score_submission(
        args.submission, truth, size, params.data.overlap, order=params.submission.rle_order
    )
    absent = sum(math.isnan(v) for v in result["iou"].values())
    print(f"mIoU {result['miou']:.4f} over {len(result['iou']) - absent} classes ({absent} absent)")
    width = max(len(name) for name in result["iou"])
    print(f"{'class':<{width}}  IoU")
    for name, value in result["iou"].items():
        print(f"{name:<{width}}  {'absent' if math.isnan(value) else f'{value:.4f}'}")
    if args.json is not None:
        write_json(args.json, {"size": size, **result})


def validate(args: argparse.Namespace) -> None:
    """Print "valid: N rows" (exit 0), or one line per problem and exit 1."""
    params = _load_params(args.params)
    size = _resolve_size(args.size, params)
    test = _load_with_classes(args.test, args.train_json, params)
    report = check_submission(args.submission, test, size)
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


# Explicit registry: subcommand name -> handler.
COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {"score": score, "validate": validate}


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
    return load_params(default) if default.is_file() else Params()


def _load_with_classes(path: Path, train_json: Path | None, params: Params) -> coco.CocoSet:
    data = params.data
    return coco.load_with_training_classes(
        path, train_json, on_bad=data.on_bad_annotation, unused=data.unused_categories
    )


def _resolve_size(size: object, params: Params) -> int | None:
    if size is _SIZE_FROM_PARAMS:
        return params.submission.size
    assert size is None or isinstance(size, int)
    return size
