"""Stage `demo`: generate the demo dataset (JPEG images, train/test/test-truth COCO jsons)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import load_params
from pipeline.demo import generate_demo
from pipeline.errors import run_main


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `path`; on success it replaces `path` whole, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        old = tmp.with_suffix(".old")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
