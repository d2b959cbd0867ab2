"""Tests for pipeline.losses: the registry, its errors and that every loss can be minimised."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.losses import LOSSES, WEIGHTED_LOSSES, build_loss


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2, 3, 8, 8) and a target with every class present."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 8, 8, generator=gen)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, :4, :4] = 1
    target[:, 4:, 4:] = 2
    return logits, target


def test_unknown_loss_lists_valid_ones() -> None:
    with pytest.raises(UserError, match=r"unknown loss 'bce' \(valid: ce, soft_ce, dice, focal, lovasz\)"):
        build_loss({"ce": 1.0, "bce": 1.0})


def test_empty_and_negative_weights_are_refused() -> None:
    with pytest.raises(UserError, match=r"train.losses is empty"):
        build_loss({})
    with pytest.raises(UserError, match=r"train.losses.dice must be >= 0"):
        build_loss({"dice": -1.0})


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_is_finite_and_decreases(name: str) -> None:
    class_weights = [0.5, 1.0, 2.0] if name in WEIGHTED_LOSSES else None
    loss_fn = build_loss({name: 1.0}, class_weights)
    logits, target = _batch()
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.3)
    values = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = loss_fn(logits, target)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert values[-1] < 0.9 * values[0], values


def test_weighted_sum_matches_its_parts() -> None:
    logits, target = _batch(1)
    combined = build_loss({"ce": 0.5, "dice": 2.0})(logits, target)
    ce = F.cross_entropy(logits, target)
    dice = build_loss({"dice": 1.0})(logits, target)
    torch.testing.assert_close(combined, 0.5 * ce + 2.0 * dice)


def test_class_weights_reach_cross_entropy() -> None:
    logits, target = _batch(2)
    weights = [0.2, 1.0, 3.0]
    got = build_loss({"ce": 1.0}, weights)(logits, target)
    torch.testing.assert_close(got, F.cross_entropy(logits, target, weight=torch.tensor(weights)))


def test_half_precision_logits_give_a_float32_loss() -> None:
    logits, target = _batch(3)
    loss = build_loss({"ce": 1.0, "dice": 1.0})(logits.to(torch.bfloat16), target)
    assert loss.dtype == torch.float32
