"""Loss registry and the weighted sum of losses that training minimises."""

from __future__ import annotations

from collections.abc import Callable

import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from pipeline.errors import UserError

# Every loss takes logits (N, C, H, W) and integer targets (N, H, W) with values in 0..C-1.
LossFactory = Callable[[list[float] | None], nn.Module]


def _cross_entropy(class_weights: list[float] | None) -> nn.Module:
    weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight)  # weight is a buffer, so .to(device) moves it


def _soft_cross_entropy(class_weights: list[float] | None) -> nn.Module:
    # Label smoothing is the point of this loss over "ce"; smp's version has no class weights.
    return smp_losses.SoftCrossEntropyLoss(smooth_factor=0.1)


def _dice(class_weights: list[float] | None) -> nn.Module:
    return smp_losses.DiceLoss(smp_losses.MULTICLASS_MODE, class_weights=class_weights)


def _focal(class_weights: list[float] | None) -> nn.Module:
    return smp_losses.FocalLoss(smp_losses.MULTICLASS_MODE, class_weights=class_weights)


def _lovasz(class_weights: list[float] | None) -> nn.Module:
    return smp_losses.LovaszLoss(smp_losses.MULTICLASS_MODE)


LOSSES: dict[str, LossFactory] = {
    "ce": _cross_entropy,
    "soft_ce": _soft_cross_entropy,
    "dice": _dice,
    "focal": _focal,
    "lovasz": _lovasz,
}
# train.class_weights applies to these; the others have no per-class weighting in smp.
WEIGHTED_LOSSES = frozenset({"ce", "dice", "focal"})


class WeightedLoss(nn.Module):
    """sum_i weight_i * loss_i(logits, target), computed in float32 even under autocast."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits: float (N, C, H, W); target: int64 (N, H, W). Returns a scalar."""
        logits = logits.float()  # softmax/log terms lose too much precision in bf16/fp16
        total = logits.new_zeros(())
        for name, loss in self.losses.items():
            total = total + self.weights[name] * loss(logits, target)
        return total


def build_loss(weights: dict[str, float], class_weights: list[float] | None = None) -> WeightedLoss:
    """The weighted sum of the named losses (`train.losses`), e.g. {"ce": 1.0, "dice": 1.0}.

    `class_weights` (one per class, background first) weight the classes in the losses that support
    it (see `WEIGHTED_LOSSES`); the others use every class equally.
    """
    if not weights:
        raise UserError(f"params: train.losses is empty (valid losses: {', '.join(LOSSES)})")
    for name, weight in weights.items():
        if name not in LOSSES:
            raise UserError(f"params: train.losses names unknown loss '{name}' (valid: {', '.join(LOSSES)})")
        if weight < 0:
            raise UserError(f"params: train.losses.{name} must be >= 0, got {weight}")
    if class_weights is not None and any(w < 0 for w in class_weights):
        raise UserError(f"params: train.class_weights must be >= 0, got {class_weights}")
    return WeightedLoss({name: LOSSES[name](class_weights) for name in weights}, weights)
