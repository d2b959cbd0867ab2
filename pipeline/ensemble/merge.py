"""Merging ensemble members' probabilities with per-class weights, at the largest member's resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.data.geometry import resize_bilinear


def merge_probabilities(probs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of members' (C, h_m, w_m) probabilities at the largest member's (h, w).

    weights: (M, C), one weight per member and class (a per-model weight repeated over classes). The
    smaller members are resized bilinearly first (as predict resizes to the output size: resizing is
    linear, so merging first and resizing once later gives the same result). Returns (C, h, w) float32.
    """
    shape = max((p.shape[-2:] for p in probs), key=lambda s: s[0] * s[1])
    total = torch.zeros((probs[0].shape[0], *shape), dtype=torch.float32, device=probs[0].device)
    for member_probs, member_weights in zip(probs, weights, strict=True):
        if member_probs.shape[-2:] != shape:
            member_probs = resize_bilinear(member_probs[None], tuple(shape))[0]
        total += member_weights.to(total)[:, None, None] * member_probs
    return total
