"""The train stage's per-epoch log line: written by `train.fit`, read back by the parallel runner."""

from __future__ import annotations

import re
from dataclasses import dataclass

_EPOCH = re.compile(
    r"epoch (?P<epoch>\d+)/(?P<epochs>\d+): train loss (?P<loss>\S+?)(?:, val mIoU (?P<miou>\S+?))?, lr \S+"
    r"(?: \((?P<seconds>[\d.]+) s(?:, val (?P<val_seconds>[\d.]+) s)?\))?"
)


@dataclass(frozen=True)
class EpochProgress:
    """One finished epoch, counted from 1; `val_miou` is None for an epoch that was not validated.
    `seconds`: wall seconds since the previous epoch's line (the first: since training began), the
    validation's `val_seconds` among them; None on lines written without them."""

    epoch: int
    epochs: int
    val_miou: float | None
    seconds: float | None = None
    val_seconds: float | None = None


def epoch_line(
    run: str,
    epoch: int,
    epochs: int,
    loss: float,
    val_miou: float | None,
    lr: float,
    seconds: float | None = None,
    val_seconds: float | None = None,
) -> str:
    """`<run> epoch 3/8: train loss 0.4123, val mIoU 0.5012, lr 1.00e-03 (41.2 s, val 3.1 s)` (epoch
    counted from 1). `seconds`: wall time since the previous epoch's line (so one epoch's checkpoint
    writes among them), `val_seconds` the validation's share: what an epoch costs under a time budget,
    which bench/realsets.py fits epoch counts by."""
    scored = f", val mIoU {val_miou:.4f}" if val_miou is not None else ""
    timed = ""
    if seconds is not None:
        timed = f" ({seconds:.1f} s" + (f", val {val_seconds:.1f} s" if val_seconds is not None else "") + ")"
    return f"{run} epoch {epoch}/{epochs}: train loss {loss:.4f}{scored}, lr {lr:.2e}{timed}"


def parse_epoch_line(line: str) -> EpochProgress | None:
    """The progress `epoch_line` wrote into `line`, or None for any other line."""
    match = _EPOCH.search(line)
    if match is None:
        return None
    miou, seconds, val_seconds = match["miou"], match["seconds"], match["val_seconds"]
    return EpochProgress(
        int(match["epoch"]),
        int(match["epochs"]),
        None if miou is None else float(miou),
        None if seconds is None else float(seconds),
        None if val_seconds is None else float(val_seconds),
    )
