"""Benchmark: predict-bundle's engines, torch and onnxruntime, on the CPU: images/s, peak memory, and how
far their predictions differ.

On a bundle exported with --onnx (default bundle.zip: `make demo`, then
`python -m pipeline export bundle --onnx`) and its test images (default data/demo/test.json):
  - speed and memory: each engine runs the bundle's whole prediction (every member's folds with their
    TTA, merged with the fitted weights, the images decoded by the loader) --repeats times in a child
    process of its own, with --threads threads; printed: the median images/s, and the child's peak RSS
    (models, sessions and batches; the imports included);
  - agreement: both engines' merged probabilities of every test image, in this process: the largest
    absolute difference, and the share of pixels whose argmax agrees.
Without the bundle it says so and exits 0, having measured nothing. Other processes competing for the
CPU skew the timings: run it on an idle machine.

    python bench/onnx.py [--bundle bundle.zip] [--images data/demo/test.json] [--threads 2] [--repeats 3]
                         [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import write_json
from pipeline.bundle.layout import read_spec
from pipeline.bundle.onnx import CPU, CUDA
from pipeline.bundle.predict import bundle_members, read_test_images, unpacked
from pipeline.inference.infer import predict_members

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle.zip", help="bundle folder or zip")
    parser.add_argument("--images", type=Path, default=REPO / "data/demo/test.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="torch's device; onnxruntime "
        "runs on CUDA where onnxruntime-gpu is installed, else on the CPU (said so)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=("torch", "onnx"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(measure(args.bundle, args.images, args.child, args.threads, args.repeats, args.device))
        )
        return
    if not args.bundle.exists():
        print(
            f"skipped: no bundle at {args.bundle} (make demo, then python -m pipeline export bundle --onnx)"
        )
        return
    with unpacked(args.bundle) as folder:
        spec = read_spec(folder)
        if not all(member.onnx for member in spec.members):
            raise SystemExit(f"error: {args.bundle}: exported without --onnx")
        figures: dict[str, Any] = {"threads": args.threads, "repeats": args.repeats, "device": args.device}
        for engine in ("torch", "onnx"):
            figures[engine] = _child(folder, args, engine)
        torch.set_num_threads(args.threads)
        figures["agreement"] = agreement(folder, args.images, args.device)
    figures["speed_ratio"] = figures["onnx"]["images_per_s"] / figures["torch"]["images_per_s"]
    figures["rss_ratio"] = figures["onnx"]["peak_rss_mib"] / figures["torch"]["peak_rss_mib"]
    n_models = sum(len(member.checkpoints) for member in spec.members)
    tta = ", ".join(f"{member.name} {member.tta}" for member in spec.members)
    print(
        f"{figures['torch']['images']} images, {n_models} models (TTA: {tta}), {args.threads} threads; "
        f"torch on {args.device}, onnxruntime's {figures['onnx']['onnx_provider']}"
    )
    print("| engine | images/s (median) | peak RSS MiB |")
    print("|---|---|---|")
    for engine in ("torch", "onnx"):
        f = figures[engine]
        print(f"| {engine} | {f['images_per_s']:.2f} | {f['peak_rss_mib']:.0f} |")
    a = figures["agreement"]
    print(
        f"onnx / torch: {figures['speed_ratio']:.2f}x the images/s, {figures['rss_ratio']:.2f}x the peak RSS"
    )
    print(
        f"agreement: max |p_onnx - p_torch| = {a['max_abs_diff']:.2e}; argmax identical on "
        f"{100 * a['argmax_agree']:.3f} % of {a['pixels']} pixels"
    )
    if args.json is not None:
        write_json(args.json, figures)


def _child(folder: Path, args: argparse.Namespace, engine: str) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--bundle",
        str(folder),
        "--images",
        str(args.images),
    ]
    command += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: the {engine} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stream(folder: Path, images: Path, engine: str, device: str):
    """(number of images, a function starting the bundle's prediction stream) for one engine."""
    spec = read_spec(folder)
    test, root = read_test_images(images, None)
    provider = onnx_provider(device) if engine == "onnx" else CPU
    members = bundle_members(folder, spec, engine, provider=provider)
    where = torch.device(device if engine == "torch" or provider == CUDA else "cpu")
    weights = torch.tensor(spec.weights, dtype=torch.float32)
    args = (spec.scales, spec.batch_size, spec.num_workers, where, spec.amp, spec.window_overlap)
    return len(test), lambda: predict_members(members, weights, root, test, *args)


def onnx_provider(device: str) -> str:
    """CUDA for a cuda run where onnxruntime has it (onnxruntime-gpu), else the CPU."""
    import onnxruntime

    return CUDA if device == "cuda" and CUDA in onnxruntime.get_available_providers() else CPU


def measure(
    folder: Path, images: Path, engine: str, threads: int, repeats: int, device: str
) -> dict[str, Any]:
    """One engine's whole prediction, `repeats` times: median images/s and this process's peak RSS."""
    torch.set_num_threads(threads)
    n_images, predictions = _stream(folder, images, engine, device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in predictions():
            pass
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    provider = onnx_provider(device) if engine == "onnx" else None
    return {"images": n_images, "seconds": seconds, "images_per_s": n_images / statistics.median(seconds),
            "peak_rss_mib": peak, "onnx_provider": provider}  # fmt: skip


def agreement(folder: Path, images: Path, device: str) -> dict[str, Any]:
    """Both engines' merged probabilities, image by image: max absolute difference, argmax agreement."""
    _, by_torch = _stream(folder, images, "torch", device)
    _, by_onnx = _stream(folder, images, "onnx", device)
    worst, agree, pixels = 0.0, 0, 0
    for (i, p), (j, q) in zip(by_torch(), by_onnx(), strict=True):
        assert i == j
        p, q = p.cpu(), q.cpu()
        worst = max(worst, float((p - q).abs().max()))
        agree += int((p.argmax(0) == q.argmax(0)).sum())
        pixels += p[0].numel()
    return {"max_abs_diff": worst, "argmax_agree": agree / pixels, "pixels": pixels}


if __name__ == "__main__":
    main()
