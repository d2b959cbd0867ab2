"""Stage `train@k`: train one fold (resumable; DDP if train.nproc > 1); write model, metrics, curves, OOF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.errors import UserError, run_main
from pipeline.runtime import launch_workers, setup_runtime, teardown, under_torchrun
from pipeline.train import FoldPaths, fit, load_fold_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fold", type=int, required=True, help="the held-out fold")
    parser.add_argument("--root", type=Path, required=True, help="folder of the json's file_names")
    parser.add_argument("--train-json", type=Path, required=True, help="COCO json of the training images")
    parser.add_argument("--masks", type=Path, required=True, help="folder of per-image mask PNGs")
    parser.add_argument("--folds", type=Path, required=True, help="folds CSV (image_id,fold)")
    parser.add_argument("--model-dir", type=Path, required=True, help="for best.pt and last.pt (resume)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON of the best epoch's IoUs")
    parser.add_argument("--live", type=Path, required=True, help="dvclive folder of the per-epoch curves")
    parser.add_argument("--oof", type=Path, required=True, help="folder of out-of-fold prediction PNGs")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    paths = FoldPaths(
        root=args.root,
        train_json=args.train_json,
        masks=args.masks,
        folds=args.folds,
        model_dir=args.model_dir,
        metrics=args.metrics,
        live=args.live,
        oof=args.oof,
    )

    nproc = params.train.nproc
    if nproc > 1 and not under_torchrun():
        # Check the params and data here, where a mistake still prints one line, then start the workers.
        load_fold_data(params, args.fold, paths)
        code = launch_workers(nproc, [__file__, *sys.argv[1:]])
        if code != 0:
            raise UserError(
                f"train@{args.fold}: the {nproc} DDP workers failed (exit code {code}); see above"
            )
        return

    runtime = setup_runtime(params.train)
    try:
        result = fit(params, args.fold, paths, runtime)
    finally:
        teardown(runtime)
    if runtime.is_main:
        print(f"fold {args.fold}: best val mIoU {result['miou']:.4f} (epoch {result['epoch'] + 1})")


if __name__ == "__main__":
    run_main(main)
