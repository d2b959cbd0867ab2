"""Tests for pipeline.models.losses: the registry, its errors and that every loss can be minimised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.images import IGNORE_INDEX
from pipeline.errors import UserError
from pipeline.models.losses import (
    LOSSES,
    MS_SSIM_MIN_SIDE,
    MS_SSIM_WINDOW,
    WEIGHTED_LOSSES,
    TrainingObjective,
    build_loss,
)


def _batch(seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2, 3, size, size) and a target with every class present."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, size, size, generator=gen)
    target = torch.zeros(2, size, size, dtype=torch.long)
    half = size // 2
    target[:, :half, :half] = 1
    target[:, half:, half:] = 2
    return logits, target


def test_unknown_loss_lists_valid_ones() -> None:
    valid = "ce, soft_ce, dice, focal, lovasz, iou, ms_ssim"
    with pytest.raises(UserError, match=rf"unknown loss 'bce' \(valid: {valid}\)"):
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
    logits, target = _batch(size=MS_SSIM_MIN_SIDE + 15 if name == "ms_ssim" else 8)
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


def test_ms_ssim_loss_is_zero_for_a_perfect_prediction_and_refuses_small_images() -> None:
    _, target = _batch(4, size=112)
    perfect = 200.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()  # softmax = one-hot to 1e-80
    loss_fn = build_loss({"ms_ssim": 1.0})
    assert loss_fn(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(torch.zeros_like(perfect), target).item() > 0.5  # uniform probabilities: no structure
    small_logits, small_target = _batch(4, size=64)
    too_small = rf"ms_ssim loss needs training images of at least {MS_SSIM_MIN_SIDE} px"
    with pytest.raises(UserError, match=too_small):
        loss_fn(small_logits, small_target)


def _ms_ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang, Simoncelli & Bovik (2003) MS-SSIM of two (H, W) images in [0, 1], written from the paper.

    Gaussian window (sigma 1.5, `MS_SSIM_WINDOW` taps, "valid" filtering), K1 0.01, K2 0.03, five scales
    2x2-averaged, exponents 0.0448, 0.2856, 0.3001, 0.2363, 0.1333: contrast-structure at every scale,
    luminance too at the coarsest.
    """
    taps = np.arange(MS_SSIM_WINDOW) - MS_SSIM_WINDOW // 2
    g = np.exp(-(taps**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(a: np.ndarray) -> np.ndarray:
        rows = np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 1, a)
        return np.apply_along_axis(lambda c: np.convolve(c, g, mode="valid"), 0, rows)

    c1, c2 = 0.01**2, 0.03**2
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    value = 1.0
    for level, weight in enumerate(weights):
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        cs = ((2 * cxy + c2) / (vx + vy + c2)).mean()
        if level < len(weights) - 1:
            value *= max(cs, 0.0) ** weight
            x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))
            y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean(axis=(1, 3))
        else:
            luminance = ((2 * mx * my + c1) / (mx**2 + my**2 + c1) * (2 * cxy + c2) / (vx + vy + c2)).mean()
            value *= max(luminance, 0.0) ** weight
    return float(value)


def test_ms_ssim_term_matches_the_papers_definition() -> None:
    """The loss is 1 - MS-SSIM(softmax, one-hot) per class, MS-SSIM as Wang et al. define it (above)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 2, 128, 128, generator=gen)
    logits[:, 1, 32:96, 40:100] += 2.5
    target = torch.zeros(1, 128, 128, dtype=torch.long)
    target[:, 30:90, 40:110] = 1
    probs = logits.softmax(dim=1)[0].double().numpy()
    onehot = F.one_hot(target[0], 2).permute(2, 0, 1).double().numpy()
    expected = 1.0 - np.mean([_ms_ssim_reference(probs[c], onehot[c]) for c in range(2)])
    got = build_loss({"ms_ssim": 1.0})(logits, target).item()
    assert got == pytest.approx(expected, abs=1e-5)
    assert 0.05 < expected < 0.95  # a partial overlap: neither trivially 0 nor 1


def test_pixel_weights_scale_each_pixels_cross_entropy() -> None:
    logits, target = _batch(6)
    loss_fn = build_loss({"ce": 1.0, "dice": 1.0})
    ones = torch.ones(target.shape)
    torch.testing.assert_close(loss_fn(logits, target, ones), loss_fn(logits, target))
    weights = torch.rand(target.shape, generator=torch.Generator().manual_seed(7)) * 4
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    dice = build_loss({"dice": 1.0})(logits, target)  # Dice is set-level: the map leaves it alone
    expected = (weights * per_pixel).sum() / target.numel() + dice
    torch.testing.assert_close(loss_fn(logits, target, weights), expected)
    class_weights = [0.5, 1.0, 2.0]
    weighted = build_loss({"ce": 1.0}, class_weights)
    torch.testing.assert_close(weighted(logits, target, ones), weighted(logits, target))


def test_training_objective_sums_side_outputs_and_the_presence_term() -> None:
    logits, target = _batch(8)
    target[1] = 0  # image 1 holds background only
    side = [logits * 0.5, logits.flip(-1)]
    presence = torch.tensor([[2.0, 1.0, -1.0], [0.0, -3.0, 0.5]])
    loss = build_loss({"ce": 1.0, "dice": 1.0})
    objective = TrainingObjective(loss, side_weights=[0.25, 2.0], presence_weight=0.5)
    got = objective({"logits": logits, "side": side, "presence": presence}, target)
    truth = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = (
        loss(logits, target)
        + 0.25 * loss(side[0], target)
        + 2.0 * loss(side[1], target)
        + 0.5 * F.binary_cross_entropy_with_logits(presence, truth)
    )
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(TrainingObjective(loss)(logits, target), loss(logits, target))
    equal = TrainingObjective(loss)({"logits": logits, "side": side}, target)
    torch.testing.assert_close(equal, loss(logits, target) + loss(side[0], target) + loss(side[1], target))
    with pytest.raises(UserError, match=r"train.side_weights has 1 weights, but the model gives 2 side"):
        TrainingObjective(loss, side_weights=[1.0])({"logits": logits, "side": side}, target)


def _with_ignored(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (2, 4, 16, 16), targets with about a third of the pixels at IGNORE_INDEX, and that mask."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 16, 16, generator=generator)
    target = torch.randint(0, 4, (2, 16, 16), generator=generator)
    ignored = torch.rand(2, 16, 16, generator=generator) < 0.33
    return logits, target.masked_fill(ignored, IGNORE_INDEX), ignored


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"ms_ssim"}))
def test_ignored_pixels_count_nowhere_in_a_loss(name: str) -> None:
    logits, target, ignored = _with_ignored()
    loss = build_loss({name: 1.0})
    logits.requires_grad_(True)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value)
    # No gradient reaches an ignored pixel's logits, and other logits there leave the loss as it was.
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[ignored] == 0)
    changed = logits.detach().clone()
    changed.permute(0, 2, 3, 1)[ignored] = torch.randn(int(ignored.sum()), 4) * 5
    torch.testing.assert_close(loss(changed, target), value.detach())


def test_cross_entropy_with_ignored_pixels_is_the_mean_over_the_others() -> None:
    logits, target, ignored = _with_ignored(1)
    kept = ~ignored
    per_pixel = F.cross_entropy(logits, target.clamp(max=3), reduction="none")
    expected = per_pixel[kept].mean()
    torch.testing.assert_close(build_loss({"ce": 1.0})(logits, target), expected)
    # The per-pixel weighted path normalises over the kept pixels too: a map of ones is the plain loss.
    torch.testing.assert_close(build_loss({"ce": 1.0})(logits, target, torch.ones(2, 16, 16)), expected)


def test_presence_target_leaves_ignored_pixels_out() -> None:
    _, target, _ = _with_ignored(2)
    target[0] = IGNORE_INDEX
    target[0, 0, 0] = 2  # image 0: class 2 and ignored pixels only
    objective = TrainingObjective(build_loss({"ce": 1.0}))
    presence = torch.zeros(2, 4, requires_grad=True)
    output = {"logits": torch.randn(2, 4, 16, 16), "presence": presence}
    objective(output, target).backward()
    # BCE's gradient is sigmoid(0) - truth: negative only for the classes each image holds.
    holds = presence.grad < 0
    assert holds[0].tolist() == [False, False, True, False]
    assert holds[1].tolist() == [bool((target[1] == c).any()) for c in range(4)]


def test_ms_ssim_refuses_ignored_pixels() -> None:
    logits = torch.randn(1, 2, 128, 128)
    target = torch.zeros(1, 128, 128, dtype=torch.long)
    target[0, 0, 0] = IGNORE_INDEX
    with pytest.raises(UserError, match="ms_ssim loss cannot skip ignored pixels"):
        build_loss({"ms_ssim": 1.0})(logits, target)


def test_class_weights_are_refused_with_a_loss_that_cannot_use_them() -> None:
    for name in sorted(set(LOSSES) - WEIGHTED_LOSSES):
        with pytest.raises(UserError, match=f"train.class_weights .* also names {name}"):
            build_loss({"ce": 1.0, name: 1.0}, [0.5, 1.0, 2.0])
    build_loss({"ce": 1.0, "dice": 1.0, "lovasz": 0.0}, [0.5, 1.0, 2.0])  # a zero-weight term is unused
