"""Stage `demo`: generate the demo dataset (JPEG images, train/test/test-truth COCO jsons)."""

from __future__ import annotations

import argparse

from pipeline.atomic import atomic_dir
from pipeline.config import load_params
from pipeline.data.demo import generate_demo
from pipeline.errors import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="dataset folder, replaced as a whole")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params).demo

    with atomic_dir(args.out) as tmp:
        generate_demo(tmp, params)
    print(
        f"demo: {params.n_train} training + {params.n_test} test images, {params.image_size} px, "
        f"seed {params.seed} -> {args.out}"
    )


if __name__ == "__main__":
    run_main(main)
