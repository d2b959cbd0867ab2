"""The train stage's per-epoch log line: written by `train.fit`, read back by the parallel runner."""

from __future__ import annotations

import re
from dataclasses import dataclass

_EPOCH = re.compile(
    r"epoch (?P<epoch>\d+)/(?P<epochs>\d+): train loss (?P<loss>\S+?)(?:, val mIoU (?P<miou>\S+?))?, lr "
)


@dataclass(frozen=True)
class EpochProgress:
    """One finished epoch, counted from 1; `val_miou` is None for an epoch that was not validated."""

    epoch: int
    epochs: int
    val_miou: float | None


def epoch_line(run: str, epoch: int, epochs: int, loss: float, val_miou: float | None, lr: float) -> str:
    """`<run> epoch 3/8: train loss 0.4123, val mIoU 0.5012, lr 1.00e-03` (epoch counted from 1)."""
    scored = f", val mIoU {val_miou:.4f}" if val_miou is not None else ""
    return f"{run} epoch {epoch}/{epochs}: train loss {loss:.4f}{scored}, lr {lr:.2e}"


def parse_epoch_line(line: str) -> EpochProgress | None:
    """The progress `epoch_line` wrote into `line`, or None for any other line."""
    match = _EPOCH.search(line)
    if match is None:
        return None
    miou = match["miou"]
    return EpochProgress(int(match["epoch"]), int(match["epochs"]), None if miou is None else float(miou))
