"""Stage `refit@<model>`: with refit.enabled, train one recipe on every training image (resumable; DDP)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import Params, Recipe, load_params
from pipeline.errors import UserError, run_main
from pipeline.writer import die_with_parent, exclusive_writer

REPORT = "refit.json"  # in the refit folder: whether it trained, for how many epochs, and why that many


def main() -> None:
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the recipe's name in params.yaml's `models`")
    parser.add_argument("--root", type=Path, required=True, help="folder of the images' file_names")
    parser.add_argument("--manifest", type=Path, required=True, help="the masks stage's manifest JSON")
    parser.add_argument("--masks", type=Path, required=True, help="folder of per-image mask PNGs")
    parser.add_argument("--folds-dir", type=Path, required=True, help="the recipe's fold<k>/best.pt folder")
    parser.add_argument("--out", type=Path, required=True, help=f"for the refit model, last.pt, {REPORT}")
    parser.add_argument("--pseudo", type=Path, default=None, help="the pseudo stage's folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    recipe = params.recipe(args.model)
    if not params.refit.enabled:
        # Off (the default), DVC still runs this stage after every fold retrain (it depends on the
        # folds): the folder is cleared to a note (the refit model and the resume state go), without the
        # seconds importing torch and smp would take. predict then ignores the folder.
        _clear(args.out, [path.name for path in args.out.glob("*.pt")] + [REPORT])
        write_json(args.out / REPORT, {"enabled": False})
        print(f"refit@{args.model}: refit.enabled is false; nothing trained")
        return
    _refit(args, params, recipe)


def _refit(args: argparse.Namespace, params: Params, recipe: Recipe) -> None:
    """Train the refit of `args.model` (or launch its DDP workers), resuming from the folder's last.pt."""
    # Imported here, not at the top: the stage's usual path (refit off, above) needs none of them.
    from pipeline.data.manifest import read_manifest
    from pipeline.models.checkpoints import REFIT_FILE
    from pipeline.training.fold_data import check_train_params
    from pipeline.training.refit import RefitPaths, fold_best_epochs, refit, refit_epochs
    from pipeline.training.runtime import launch_workers, setup_runtime, teardown, under_torchrun

    report = args.out / REPORT
    if not under_torchrun():
        # What a previous run finished goes first: a kill from here on leaves no stale final model behind.
        # last.pt (DVC persists the folder) stays: a resumed run continues from it.
        _clear(args.out, [REFIT_FILE, REPORT])
    folds = [args.folds_dir / f"fold{k}" / "best.pt" for k in params.ensemble.folds]
    best = [] if params.refit.epochs is not None else fold_best_epochs(folds)
    epochs = refit_epochs(params.refit.epochs, best)
    paths = RefitPaths(args.root, args.manifest, args.masks, args.out, args.pseudo)
    # One node, runtime.nproc processes, whatever runtime.nnodes says: one model, not a fold matrix.
    nproc = params.runtime.nproc
    launching = nproc > 1 and not under_torchrun()
    with exclusive_writer(args.out) if not under_torchrun() else contextlib.nullcontext():
        if launching:
            check_train_params(recipe.train, recipe.name, len(read_manifest(args.manifest).classes))
            code = launch_workers(nproc, [__file__, *sys.argv[1:]], None)
            if code != 0:
                raise UserError(f"refit@{args.model}: the DDP workers failed (exit code {code}); see above")
            return
        runtime = setup_runtime(recipe.train, params.runtime.num_workers)
        try:
            result = refit(recipe, params.runtime.num_workers, paths, runtime, epochs)
        finally:
            teardown(runtime)
        if runtime.is_main:
            why = "refit.epochs" if params.refit.epochs is not None else f"median of the folds' best {best}"
            write_json(report, {"enabled": True, "epochs": epochs, "chosen_by": why, **result})
            final = args.out / REFIT_FILE
            print(f"refit@{args.model}: {epochs} epochs ({why}) on every training image -> {final}")


def _clear(folder: Path, names: list[str]) -> None:
    """Remove `names` from `folder`, creating it if missing."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).unlink(missing_ok=True)


if __name__ == "__main__":
    run_main(main)
