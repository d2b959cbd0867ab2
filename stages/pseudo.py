"""Stage `pseudo`: the frozen teacher's test probabilities as pseudo-labels, or an empty set when disabled."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params
from pipeline.data.manifest import read_manifest
from pipeline.data.probstore import read_probabilities
from pipeline.data.pseudo import REFREEZE, read_pseudo, summary, teacher_file, write_empty, write_pseudo
from pipeline.errors import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", type=Path, required=True, help="folder of the frozen teacher's test.npz")
    parser.add_argument("--manifest", type=Path, required=True, help="the masks stage's manifest JSON")
    parser.add_argument("--out", type=Path, required=True, help="pseudo-label folder to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    pseudo = load_params(args.params).pseudo
    manifest = read_manifest(args.manifest)

    if not pseudo.enabled:
        # Never reads the teacher: whatever it holds, the output and the train stages stay as they are.
        write_empty(args.out, manifest.classes)
        print(f"{args.out}: no pseudo-labels (pseudo.enabled is false)")
        return
    teacher = read_probabilities(teacher_file(args.teacher), "teacher probabilities", REFREEZE)
    pixels = write_pseudo(
        args.out, teacher, manifest.test, manifest.classes, pseudo.threshold, str(args.manifest)
    )
    print(f"{args.out}: {summary(read_pseudo(args.out), pixels)}")


if __name__ == "__main__":
    run_main(main)
