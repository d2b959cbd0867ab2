"""The k best validated epochs' weights kept on disk, and their average (params `train.average_top_k`).

Averaging the weights of the best few checkpoints of one run (Contrails 4th: the 5 best; CryoET 1st:
"almost always increased" the score) lands between nearby minima, which tends to generalise better than
any one of them. The k best epochs by validation mIoU are kept as files under `<model dir>/top_k/`;
last.pt names them (epoch, score), so a resumed run continues with the same set. After the last epoch
their weights are averaged, validated, and saved as best.pt.

BatchNorm: the running statistics are averaged with the weights, as the EMA here does
(`use_buffers=True`), not recomputed on training batches. Recomputing would cost a pass over the
training set with its augmentation, and under DDP on CPU each rank's statistics differ; the averaged
model's own validation score, which best.pt records, shows whether the averaged statistics serve it.
Integer buffers (BatchNorm's batch counters) are taken from the latest of the k epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.models.checkpoints import load_checkpoint, save_checkpoint

TOP_DIR = "top_k"


def top_k_path(model_dir: Path, epoch: int) -> Path:
    """Where epoch `epoch`'s (0-based) weights are kept while it is among the k best."""
    return model_dir / TOP_DIR / f"epoch{epoch:04d}.pt"


def updated_top_k(
    top: Sequence[tuple[int, float]], epoch: int, score: float, k: int
) -> list[tuple[int, float]]:
    """The k best (epoch, score) once `epoch` scored `score`: highest first, an earlier epoch first on a
    tie (it was kept first), a NaN score below every number."""
    ranked = sorted([*top, (epoch, score)], key=lambda item: (_rank(item[1]), item[0]))
    return [(int(e), float(s)) for e, s in ranked[:k]]


def _rank(score: float) -> float:
    return math.inf if math.isnan(score) else -score


def keep(model_dir: Path, epoch: int, score: float, state: dict[str, torch.Tensor]) -> None:
    """Save `state` (a state_dict) as epoch `epoch`'s kept weights."""
    save_checkpoint(top_k_path(model_dir, epoch), {"epoch": epoch, "score": score, "model_state": state})


def prune(model_dir: Path, top: Sequence[tuple[int, float]]) -> None:
    """Remove kept weights of epochs no longer in `top` (left by a better epoch, or by a kill between a
    file's write and last.pt's)."""
    folder = model_dir / TOP_DIR
    if not folder.is_dir():
        return
    wanted = {top_k_path(model_dir, epoch).name for epoch, _ in top}
    for path in folder.iterdir():
        if path.name not in wanted:
            path.unlink()


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (accumulated in float64, returned in each tensor's
    dtype); any other tensor (integer counters) from the last state."""
    if not states:
        raise ValueError("average_states needs at least one state")
    keys = list(states[0])
    for state in states[1:]:
        if list(state) != keys:
            raise ValueError("states to average hold different keys")
    averaged = {}
    for key in keys:
        first = states[0][key]
        if first.is_floating_point():
            total = sum(state[key].to(torch.float64) for state in states)
            averaged[key] = (total / len(states)).to(first.dtype)
        else:
            averaged[key] = states[-1][key].clone()
    return averaged


def averaged_top_k(model_dir: Path, top: Sequence[tuple[int, float]]) -> dict[str, torch.Tensor]:
    """The average of the kept weights of `top`'s epochs, in epoch order (so the last is the latest)."""
    epochs = sorted(epoch for epoch, _ in top)
    return average_states([load_checkpoint(top_k_path(model_dir, e))["model_state"] for e in epochs])
