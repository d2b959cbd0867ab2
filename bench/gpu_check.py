"""GPU check in one call: the demo's stages on the device (bf16, channels_last, torch.compile on one
recipe), the training loader against synthetic batches, predict throughput of torch and ONNX, and the
offline bundle path; one JSON of figures.

On a GPU machine (under 8 minutes on one GPU; the first thing to run when one is lent):
  1. `dvc repro` of the demo config (params.yaml) in a fresh workspace, 2 epochs, train.amp (bf16 where
     the GPU has it) and channels_last, the first recipe with train.compile: true; seconds per stage
     family, OOF and leaderboard mIoU;
  2. `python -m pipeline export --onnx`, then `predict-bundle` in a folder of its own: seconds, and
     whether its CSV is the predict stage's byte for byte;
  3. bench/onnx.py on that bundle: images/s of torch on the device and of onnxruntime (on CUDA where
     onnxruntime-gpu is installed, else its CPU provider, said so), their agreement;
  4. bench/train_gpu.py: training img/s fed by the real loader vs by synthetic GPU tensors.
With --device cpu the same steps run at toy size on the CPU (no compile: inductor's CPU build takes
minutes), so the script is known to work before a GPU is lent; the test suite runs it that way.

    python bench/gpu_check.py --out gpu_check.json            # exits 0 with a message without CUDA
    python bench/gpu_check.py --device cpu --out check.json   # toy size, about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.atomic import write_json
from pipeline.config import complete
from recipe import make_workspace, subprocess_env, write_params

REPO = Path(__file__).resolve().parents[1]
# --device cpu: the demo pipeline at the size the tests use (one recipe, two folds, 64 px, one epoch).
TOY = {
    "demo": {"n_train": 12, "n_test": 3, "image_size": 64, "max_objects": 2},
    "augment": {"size": 64},
    "train": {"epochs": 1, "batch_size": 4},
    "runtime": {"num_workers": 0},
    "split": {"n_splits": 2},
    "ensemble": {"folds": [0, 1], "grid_step": 0.5},
    "predict": {"batch_size": 4, "num_workers": 0},
    "submission": {"size": 32},
    "models": {"unet": {"model": {"arch": "Unet", "decoder_channels": [32, 16, 16, 8, 8]}}},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON of figures")
    parser.add_argument("--work", type=Path, help="workspace folder (default: a temporary one)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine")
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        figures = run_check(args.device, work)
    write_json(args.out, figures)
    print(f"wrote {args.out}")
    failed = [name for name, step in figures["steps"].items() if not step.get("ok")]
    if failed:
        raise SystemExit(f"error: failed steps: {', '.join(failed)} (see {args.out})")


def run_check(device: str, work: Path) -> dict[str, Any]:
    """Every step in `work`, each timed and recorded even when an earlier one failed."""
    figures: dict[str, Any] = {"device": device, "environment": environment(device), "steps": {}}
    env = subprocess_env(threads=os.cpu_count() or 1)
    if device == "cuda":
        env.pop("CUDA_VISIBLE_DEVICES")  # subprocess_env hides the GPU from CPU benchmarks
    steps = figures["steps"]
    project = work / "project"
    steps["repro"] = _step(lambda: repro(project, device, env))
    bundle = work / "bundle"
    if steps["repro"]["ok"]:
        steps["bundle"] = _step(lambda: bundle_path(project, bundle, work / "notebook", env))
    if steps.get("bundle", {}).get("ok"):
        steps["onnx"] = _step(lambda: onnx_bench(project, bundle, device, work / "onnx.json", env))
    steps["train_loader"] = _step(lambda: train_loader(device, env))
    for name, step in steps.items():
        print(f"{name}: {'ok' if step['ok'] else 'FAILED'} in {step['seconds']:.1f} s"
              + ("" if step["ok"] else f": {step['error'][-300:]}"))  # fmt: skip
    return figures


def environment(device: str) -> dict[str, Any]:
    found: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    if device == "cuda":
        found["gpu"] = torch.cuda.get_device_name()
        found["bf16"] = torch.cuda.is_bf16_supported()
    try:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
        found["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        found["onnxruntime"] = None
    return found


def repro(project: Path, device: str, env: dict[str, str]) -> dict[str, Any]:
    """The demo pipeline from scratch: its seconds, the stages it ran, OOF and leaderboard mIoU."""
    project.mkdir(parents=True)
    make_workspace(project)
    if device == "cuda":
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["train"]["epochs"] = 2
        first = next(iter(params["models"]))
        params["models"][first].setdefault("train", {})["compile"] = True
    else:
        params = complete(TOY)
    write_params(project, params)
    started = time.perf_counter()
    log = _run([sys.executable, "-m", "dvc", "repro"], project, env)
    seconds = time.perf_counter() - started
    cv = json.loads((project / "metrics/cv.json").read_text())
    board = json.loads((project / "metrics/leaderboard.json").read_text())
    return {"seconds_total": seconds, "stages_run": _stages_run(log), "oof_miou": cv.get("oof_miou"),
            "leaderboard_miou": board.get("miou"), "execution": _execution(log)}  # fmt: skip


def bundle_path(project: Path, bundle: Path, notebook: Path, env: dict[str, str]) -> dict[str, Any]:
    """export --onnx, then predict-bundle from the zip in a folder of its own; the same CSV?"""
    started = time.perf_counter()
    _run([sys.executable, "-m", "pipeline", "export", str(bundle), "--onnx"], project, env)
    exported = time.perf_counter() - started
    notebook.mkdir()
    test = yaml.safe_load((project / "params.yaml").read_text())["data"]["test_json"]
    started = time.perf_counter()
    command = [sys.executable, "-m", "pipeline", "predict-bundle", str(bundle) + ".zip", str(project / test)]
    _run([*command, str(notebook / "submission.csv")], notebook, env)
    predicted = time.perf_counter() - started
    same = (notebook / "submission.csv").read_bytes() == (project / "submissions/submission.csv").read_bytes()
    if not same:
        raise RuntimeError("predict-bundle's CSV differs from the predict stage's")
    return {"export_seconds": exported, "predict_bundle_seconds": predicted, "identical_csv": same}


def onnx_bench(project: Path, bundle: Path, device: str, out: Path, env: dict[str, str]) -> dict[str, Any]:
    test = yaml.safe_load((project / "params.yaml").read_text())["data"]["test_json"]
    command = [
        sys.executable,
        str(REPO / "bench/onnx.py"),
        "--bundle",
        str(bundle),
        "--images",
        str(project / test),
    ]
    command += [
        "--threads",
        str(os.cpu_count() or 1),
        "--repeats",
        "2",
        "--device",
        device,
        "--json",
        str(out),
    ]
    _run(command, REPO, env)
    return json.loads(out.read_text())


def train_loader(device: str, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, str(REPO / "bench/train_gpu.py"), "--device", device]
    if device == "cuda":
        command += ["--steps", "50", "--repeats", "2"]
    else:
        command += ["--arch", "Unet", "--encoder", "resnet18", "--size", "64", "--steps", "2"]
        command += ["--repeats", "1", "--images", "8", "--workers", "0"]
    text = _run(command, REPO, env)
    rates = dict(re.findall(r"^(real loader|synthetic \(\w+\)):\s+([\d.]+) img/s", text, flags=re.MULTILINE))
    ratio = re.search(r"real / synthetic = ([\d.]+)", text)
    return {"real_img_s": float(rates.get("real loader", "nan")),
            "synthetic_img_s": float(next((v for k, v in rates.items() if k.startswith("synthetic")), "nan")),
            "ratio": float(ratio.group(1)) if ratio else None, "output": text[-2000:]}  # fmt: skip


def _step(fn) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        return {"ok": True, **fn(), "seconds": time.perf_counter() - started}
    except (RuntimeError, OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "seconds": time.perf_counter() - started,
        }


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {done.returncode}: {text[-1500:]}")
    return text


def _stages_run(log: str) -> dict[str, int]:
    """How many stages of each name ran (the matrix stages counted together)."""
    counts: dict[str, int] = {}
    for stage in re.findall(r"Running stage '([^'@]+)", log):
        counts[stage] = counts.get(stage, 0) + 1
    return counts


def _execution(log: str) -> list[str]:
    """The train stages' own lines about device and precision, as they printed them."""
    return sorted(
        {
            line.strip()
            for line in log.splitlines()
            if re.search(r"\b(bf16|fp16|float32|cuda|channels_last)\b", line)
        }
    )[:10]


if __name__ == "__main__":
    main()
