"""Loss registry, the weighted sum of losses, and the training objective over a model's outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytorch_msssim
import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from pipeline.data.images import IGNORE_INDEX
from pipeline.errors import UserError

# Every loss takes logits (N, C, H, W) and integer targets (N, H, W) with values in 0..C-1, or
# IGNORE_INDEX for a pixel that must count nowhere (pseudo-labels the teacher was unsure of). ms_ssim has
# no per-pixel term to leave out: config refuses it with pseudo-labels, and it refuses ignored pixels.
LossFactory = Callable[[list[float] | None], nn.Module]

# MS-SSIM's Gaussian window: Wang et al.'s sigma 1.5 with a 7-pixel window (11 in the paper) so that five
# scales fit from 97 px up (pytorch_msssim needs a side above (win - 1) * 2**4): 128 px training works.
MS_SSIM_WINDOW = 7
MS_SSIM_MIN_SIDE = (MS_SSIM_WINDOW - 1) * 2**4 + 1


class PixelWeightedCrossEntropy(nn.Module):
    """Cross-entropy with optional class weights and an optional per-pixel weight map.

    Without a map it is `nn.CrossEntropyLoss(weight=class_weights, ignore_index=IGNORE_INDEX)`. With a
    map w (N, H, W) it is sum(w * cw[t] * ce) / sum(cw[t]) over the pixels not ignored: the map scales
    each pixel's share as the U-Net paper's weighted energy does, and the normalisation is PyTorch's own,
    so a map of ones gives the plain loss.
    """

    def __init__(self, class_weights: list[float] | None) -> None:
        super().__init__()
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("weight", weight)  # a buffer, so .to(device) moves it

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pixel_weights is None:
            return F.cross_entropy(logits, target, weight=self.weight, ignore_index=IGNORE_INDEX)
        per_pixel = F.cross_entropy(
            logits, target, weight=self.weight, reduction="none", ignore_index=IGNORE_INDEX
        )  # 0 at ignored pixels
        kept = target != IGNORE_INDEX
        norm = self.weight[target[kept]].sum() if self.weight is not None else kept.sum()
        return (per_pixel * pixel_weights.to(per_pixel)).sum() / norm


class MultiScaleSSIMLoss(nn.Module):
    """1 - MS-SSIM between the softmax probabilities and the one-hot target, averaged over classes.

    U-Net 3+'s structural term (Huang et al., 2020), from pytorch_msssim (data range 1, five scales with
    Wang et al.'s weights, sigma 1.5, a `MS_SSIM_WINDOW`-pixel window); each class is one channel.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if min(logits.shape[-2:]) < MS_SSIM_MIN_SIDE:
            raise UserError(
                f"params: the ms_ssim loss needs training images of at least {MS_SSIM_MIN_SIDE} px "
                f"(augment.size), got {tuple(logits.shape[-2:])}"
            )
        if bool((target == IGNORE_INDEX).any()):
            raise UserError("params: the ms_ssim loss cannot skip ignored pixels (pseudo-labels)")
        probs = logits.softmax(dim=1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs)
        score = pytorch_msssim.ms_ssim(probs, onehot, data_range=1.0, win_size=MS_SSIM_WINDOW)
        return 1.0 - score


def _cross_entropy(class_weights: list[float] | None) -> nn.Module:
    return PixelWeightedCrossEntropy(class_weights)


def _soft_cross_entropy(class_weights: list[float] | None) -> nn.Module:
    # Label smoothing is the point of this loss over "ce"; smp's version has no class weights.
    return smp_losses.SoftCrossEntropyLoss(smooth_factor=0.1, ignore_index=IGNORE_INDEX)


def _dice(class_weights: list[float] | None) -> nn.Module:
    return smp_losses.DiceLoss(
        smp_losses.MULTICLASS_MODE, class_weights=class_weights, ignore_index=IGNORE_INDEX
    )


def _focal(class_weights: list[float] | None) -> nn.Module:
    return smp_losses.FocalLoss(
        smp_losses.MULTICLASS_MODE, class_weights=class_weights, ignore_index=IGNORE_INDEX
    )


def _lovasz(class_weights: list[float] | None) -> nn.Module:
    return smp_losses.LovaszLoss(smp_losses.MULTICLASS_MODE, ignore_index=IGNORE_INDEX)


def _iou(class_weights: list[float] | None) -> nn.Module:
    # Soft Jaccard, U-Net 3+'s region term (smp's: 1 - soft IoU, averaged over the classes present).
    return smp_losses.JaccardLoss(smp_losses.MULTICLASS_MODE, ignore_index=IGNORE_INDEX)


def _ms_ssim(class_weights: list[float] | None) -> nn.Module:
    return MultiScaleSSIMLoss()


LOSSES: dict[str, LossFactory] = {
    "ce": _cross_entropy,
    "soft_ce": _soft_cross_entropy,
    "dice": _dice,
    "focal": _focal,
    "lovasz": _lovasz,
    "iou": _iou,
    "ms_ssim": _ms_ssim,
}
# train.class_weights applies to these; the others have no per-class weighting in smp.
WEIGHTED_LOSSES = frozenset({"ce", "dice", "focal"})
# train.boundary_w0's weight map applies to these (per-pixel losses; the others are set-level).
PIXEL_WEIGHTED_LOSSES = frozenset({"ce"})


class WeightedLoss(nn.Module):
    """sum_i weight_i * loss_i(logits, target), computed in float32 even under autocast."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits: float (N, C, H, W); target: int64 (N, H, W); pixel_weights: float (N, H, W) for the
        losses in `PIXEL_WEIGHTED_LOSSES` (the others ignore it). Returns a scalar."""
        logits = logits.float()  # softmax/log terms lose too much precision in bf16/fp16
        total = logits.new_zeros(())
        for name, loss in self.losses.items():
            if pixel_weights is not None and name in PIXEL_WEIGHTED_LOSSES:
                value = loss(logits, target, pixel_weights)
            else:
                value = loss(logits, target)
            total = total + self.weights[name] * value
        return total


# What a model's forward returns in training: logits, or with deep supervision / a classification-guided
# module a dict {"logits": (N,C,H,W), "side": [(N,C,H,W), ...], "presence": (N,C)} (models.architectures).
ModelOutput = torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]


class TrainingObjective(nn.Module):
    """The loss of one training batch over every output the model gives.

    loss(logits) + sum_i side_weights[i] * loss(side_i) + presence_weight * BCE(presence, classes in the
    mask): `loss` is the weighted sum of `train.losses` (with the boundary weight map if given), applied to
    the main output and to each deep-supervision side output alike; the presence head of U-Net 3+'s
    classification-guided module learns which classes each image's mask holds.
    """

    def __init__(
        self, loss: WeightedLoss, side_weights: Sequence[float] | None = None, presence_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.loss = loss
        self.side_weights = None if side_weights is None else list(side_weights)
        self.presence_weight = presence_weight

    def forward(
        self, output: ModelOutput, target: torch.Tensor, pixel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Losses in float32 whatever the autocast dtype: CPU autocast leaves softmax in bf16, whose 8-bit
        # mantissa would round the dice sums.
        if isinstance(output, torch.Tensor):
            return self.loss(output.float(), target, pixel_weights)
        total = self.loss(output["logits"].float(), target, pixel_weights)
        sides = output.get("side", [])
        weights = [1.0] * len(sides) if self.side_weights is None else self.side_weights
        if len(weights) != len(sides):
            raise UserError(
                f"params: train.side_weights has {len(weights)} weights, but the model gives "
                f"{len(sides)} side outputs (deepest last)"
            )
        for weight, side in zip(weights, sides, strict=True):
            total = total + weight * self.loss(side.float(), target, pixel_weights)
        if "presence" in output:
            presence = output["presence"].float()
            # 1 where class c occurs in image n: a scatter over the pixels, not an (N, H, W, C) one-hot;
            # ignored pixels go to an extra column that is dropped.
            n, c = presence.shape
            index = target.flatten(1).masked_fill(target.flatten(1) == IGNORE_INDEX, c)
            truth = presence.new_zeros(n, c + 1).scatter_(1, index, 1.0)[:, :c]
            total = total + self.presence_weight * F.binary_cross_entropy_with_logits(presence, truth)
        return total


def build_loss(weights: dict[str, float], class_weights: list[float] | None = None) -> WeightedLoss:
    """The weighted sum of the named losses (`train.losses`), e.g. {"ce": 1.0, "dice": 1.0}.

    `class_weights` (one per class, background first) weight the classes; every loss named with a
    positive weight must support them (`WEIGHTED_LOSSES`), or they are refused.
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
    unweighted = sorted(n for n, weight in weights.items() if weight > 0 and n not in WEIGHTED_LOSSES)
    if class_weights is not None and unweighted:
        # Dropping the weights for these would train a different objective than the params say.
        raise UserError(
            f"params: train.class_weights weights only {', '.join(sorted(WEIGHTED_LOSSES))}; train.losses "
            f"also names {', '.join(unweighted)}, which has no per-class weighting: drop one of the two"
        )
    return WeightedLoss({name: LOSSES[name](class_weights) for name in weights}, weights)
