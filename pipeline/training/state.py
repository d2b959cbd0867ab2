"""What an optimizer step changes (model, optimizer, schedule, scaler, EMA, under DDP) and its resume dict."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config import ModelParams, TrainParams
from pipeline.errors import UserError
from pipeline.models.factory import build_model, parameter_groups
from pipeline.training.resume import restore_rng_states, rng_states
from pipeline.training.runtime import Runtime


@dataclass
class TrainState:
    """Everything an optimizer step changes, i.e. what the resume state holds."""

    raw: nn.Module  # the plain smp model: its state_dict is what checkpoints store
    model: nn.Module  # what training runs: raw, or raw compiled and/or wrapped in DDP
    net: nn.Module  # raw or compiled raw, without DDP: evaluation needs no gradient sync
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    # train.ema: the exponential moving average of raw's weights and buffers, updated after every
    # optimizer step; validated and saved in best.pt in place of raw. None when off.
    ema: AveragedModel | None = None

    @property
    def evaluated(self) -> nn.Module:
        """What validation runs and best.pt stores: the EMA model when on, else the trained one."""
        return self.net if self.ema is None else self.ema.module

    @property
    def kept(self) -> nn.Module:
        """The module whose weights best.pt stores (raw, or the EMA copy of raw)."""
        return self.raw if self.ema is None else self.ema.module


def build_train_state(
    model_params: ModelParams,
    train: TrainParams,
    n_classes: int,
    runtime: Runtime,
    total_steps: int,
    resume: dict[str, Any] | None,
) -> TrainState:
    """Model, AdamW and warmup-cosine schedule (per optimizer step), loaded from `resume` if given."""
    raw = build_model(model_params, n_classes).to(runtime.device)
    if runtime.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    if runtime.distributed and runtime.device.type == "cuda":
        # Per-GPU batches are small at 512 px; statistics over the global batch are steadier.
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    # Encoder and decoder at their own lrs; weight decay on weights only (models.factory.parameter_groups).
    groups = parameter_groups(raw, train.lr, train.encoder_lr, train.weight_decay)
    # The fused kernel (CUDA; CPU since torch 2.4) updates every parameter in one pass: on a 2-core CPU
    # the ResNet-18 U-Net's AdamW step took 15.6 ms fused against 77.2 ms looping over its tensors
    # (bench/cpu_precision.py, docs/results.md).
    optimizer = torch.optim.AdamW(groups, lr=train.lr, fused=True)
    warmup_steps = round(train.warmup_epochs * total_steps / train.epochs)
    schedule = functools.partial(
        lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, cosine=train.schedule == "cosine"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_scaler)
    ema = None
    if train.ema is not None:
        # use_buffers: BatchNorm's running statistics are averaged too, so the EMA model validates with
        # statistics of its own weights' trajectory and needs no extra pass over the data.
        ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(train.ema), use_buffers=True)
    if resume is not None:
        raw.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        scheduler.load_state_dict(resume["scheduler_state"])
        scaler.load_state_dict(resume["scaler_state"])
        restore_rng_states(resume["rng"])
        if ema is not None:
            ema.load_state_dict(resume["ema_state"])
    net = torch.compile(raw) if train.compile else raw
    model = net
    if runtime.distributed:
        # Architecture options may leave parameters out of the graph (an encoder_depth below 5 skips
        # the encoder's last stage); DDP must then look for them, at a small cost per step.
        model = DistributedDataParallel(
            net,
            device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None,
            find_unused_parameters=bool(model_params.options),
        )
    return TrainState(raw, model, net, optimizer, scheduler, scaler, ema)


def lr_factor(step: int, warmup_steps: int, total_steps: int, cosine: bool = True) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then cosine to 0.

    Warmup rises from 1/warmup_steps to 1 over `warmup_steps` steps; the cosine then falls from 1 at
    step warmup_steps to 0 at step total_steps. With `cosine` False the lr stays at 1 after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_side_weights(train: TrainParams, name: str, arch: str, model: nn.Module) -> None:
    """train.side_weights must give one weight per deep-supervision side output of the built model."""
    weights = train.side_weights
    n_side = getattr(model, "n_side_outputs", 0)
    if weights is not None and len(weights) != n_side:
        raise UserError(
            f"params: models.{name}: train.side_weights has {len(weights)} weights, but "
            f"{arch} with these model.options gives {n_side} side outputs"
        )


def resume_state(
    state: TrainState,
    fingerprint: str,
    history: list[dict],
    best_score: float,
    best_epoch: int | None,
    best_iou: dict[str, float] | None,
    top_k: list[tuple[int, float]],
) -> dict[str, Any]:
    """Everything needed to continue after the last finished epoch (tensors and builtins only), the
    epoch best.pt holds with its per-class IoU (so best.pt can be rewritten if a kill cut its write), and
    the epochs whose weights train.average_top_k keeps."""
    return {
        "fingerprint": fingerprint,
        "epoch": len(history) - 1,
        "history": history,
        "best_score": best_score,
        "best_epoch": best_epoch,
        "best_iou": best_iou,
        "model_state": state.raw.state_dict(),
        "optimizer_state": state.optimizer.state_dict(),
        "scheduler_state": state.scheduler.state_dict(),
        "scaler_state": state.scaler.state_dict(),
        "rng": rng_states(),
        "ema_state": None if state.ema is None else state.ema.state_dict(),
        "top_k": [list(item) for item in top_k],
    }
