"""Stage `train@<model>-<fold>`: train one model recipe on one fold (resumable; DDP over nproc x nnodes)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from pipeline.config import Recipe, load_params
from pipeline.errors import UserError, run_main
from pipeline.models.factory import check_model_params
from pipeline.training.fold_data import FoldPaths, check_train_params, load_fold_data
from pipeline.training.runtime import launch_workers, resolve_nodes, setup_runtime, teardown, under_torchrun
from pipeline.training.train import fit
from pipeline.writer import die_with_parent, exclusive_writer


def main() -> None:
    # Killed with its dvc (or, as a DDP worker, with its launcher): never an orphan writing on beside
    # the re-run that comes next.
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the recipe's name in params.yaml's `models`")
    parser.add_argument("--fold", type=int, required=True, help="the held-out fold")
    parser.add_argument("--root", type=Path, required=True, help="folder of the images' file_names")
    parser.add_argument("--manifest", type=Path, required=True, help="the masks stage's manifest JSON")
    parser.add_argument("--masks", type=Path, required=True, help="folder of per-image mask PNGs")
    parser.add_argument("--folds", type=Path, required=True, help="folds CSV (image_id,fold)")
    parser.add_argument("--model-dir", type=Path, required=True, help="for best.pt and last.pt (resume)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON of the best epoch's mIoU")
    parser.add_argument("--live", type=Path, required=True, help="dvclive folder of the per-epoch curves")
    parser.add_argument(
        "--pseudo", type=Path, default=None, help="the pseudo stage's folder (pseudo-labelled test images)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    recipe = params.recipe(args.model)
    # Every recipe, not only this one: a typo in the last model stops `dvc repro` before the first trains.
    for other in params.models.values():
        check_recipe(other)
    paths = FoldPaths(
        root=args.root,
        manifest=args.manifest,
        masks=args.masks,
        folds=args.folds,
        model_dir=args.model_dir,
        metrics=args.metrics,
        live=args.live,
        pseudo=args.pseudo,
    )

    nproc, nnodes = params.runtime.nproc, params.runtime.nnodes
    launching = (nproc > 1 or nnodes > 1) and not under_torchrun()
    nodes = resolve_nodes(params.runtime, os.environ) if launching else None
    # One writer per fold: this process holds the model folder for its whole run (under DDP the
    # launcher holds it; its workers write under its lock, and other nodes' launchers write nothing).
    holds = not under_torchrun() and (nodes is None or nodes.node_rank == 0)
    with exclusive_writer(args.model_dir) if holds else contextlib.nullcontext():
        if launching:
            # Check the params and data here, where a mistake still prints one line, then start the workers.
            data = load_fold_data(args.fold, paths)
            check_train_params(recipe.train, recipe.name, len(data.classes))
            code = launch_workers(nproc, [__file__, *sys.argv[1:]], nodes)
            if code != 0:
                nodes_part = "" if nodes is None else f" on {nnodes} nodes (this is node {nodes.node_rank})"
                logs = "" if nodes is None else " and the other nodes' logs"
                raise UserError(
                    f"train@{args.model}-{args.fold}: the {nproc * nnodes} DDP workers{nodes_part} failed "
                    f"(exit code {code}); see above{logs}"
                )
            return

        runtime = setup_runtime(recipe.train, params.runtime.num_workers)
        try:
            result = fit(
                recipe, params.runtime.num_workers, args.fold, paths, runtime, average=params.metric.average
            )
        finally:
            teardown(runtime)
    if runtime.is_main:
        print(
            f"{args.model} fold {args.fold}: best val mIoU {result['miou']:.4f} (epoch {result['epoch'] + 1})"
        )


def check_recipe(recipe: Recipe) -> None:
    """`models.factory.check_model_params` of one recipe, its errors naming the recipe's key."""
    try:
        check_model_params(recipe.model)
    except UserError as exc:
        # The value may be the recipe's own or inherited from the shared `model` section: name the recipe.
        raise UserError(str(exc).replace("params: model.", f"params: models.{recipe.name}: model.")) from None


if __name__ == "__main__":
    run_main(main)
