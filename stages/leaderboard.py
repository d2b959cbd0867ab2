"""Stage `leaderboard`: score the submission against the test truth, as `python -m pipeline score` does."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import load_params
from pipeline.data import coco
from pipeline.errors import run_main
from pipeline.evaluation.sidecar import resolve_encoding
from pipeline.evaluation.submission import score_submission


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--submission", type=Path, required=True, help="submission CSV to score")
    parser.add_argument("--truth", type=Path, required=True, help="COCO json of the test truth")
    parser.add_argument(
        "--train-json", type=Path, help="training COCO json, which decides the classes (needed for drop)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="leaderboard metrics JSON to write (headline)"
    )
    parser.add_argument("--report", type=Path, required=True, help="JSON with the per-class IoUs too")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    average = params.metric.average

    data = params.data
    truth = coco.load_with_training_classes(
        args.truth, args.train_json, on_bad=data.on_bad_annotation, unused=data.unused_categories
    )
    if not truth.has_annotations:
        # The real competition's test.json: its truth is on the leaderboard. Say so in the metrics
        # rather than fail, so a full `dvc repro` still runs; the printed line makes it visible.
        reason = f"{args.truth} has no annotations"
        write_json(
            args.report, {"miou": None, "iou": {}, "average": average, "scored": False, "reason": reason}
        )
        write_json(args.out, {"miou": None})
        print(f"leaderboard: not scored, {args.truth} has no annotations (the organisers hold the truth)")
        return
    # The sidecar predict wrote says the CSV's order and size (params may have changed since).
    submission = params.submission
    order, size = resolve_encoding(
        args.submission, None, submission.size, submission.rle_order, size_given=False
    )
    result = score_submission(args.submission, truth, size, data.overlap, order=order, average=average)
    write_json(args.report, result)  # with the average it was scored by
    # Headline only, numbers only: per-class columns would make `dvc metrics show` unreadable.
    write_json(args.out, {"miou": result["miou"]})
    ignored = f" ({truth.ignored} truth annotations of dropped categories ignored)" if truth.ignored else ""
    print(f"leaderboard mIoU {result['miou']:.4f} ({average} average){ignored}")


if __name__ == "__main__":
    run_main(main)
