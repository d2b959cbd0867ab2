"""Tests for train.average_top_k's bookkeeping on hand-made states (training with it: tests/test_train.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.models.checkpoints import load_checkpoint
from pipeline.training.topk import TOP_DIR, average_states, keep, prune, top_k_path, updated_top_k


def test_two_hand_made_checkpoints_average_to_their_mean(tmp_path: Path) -> None:
    a = {
        "w": torch.tensor([1.0, 2.0]),
        "bn.running_var": torch.tensor([0.5]),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    b = {
        "w": torch.tensor([3.0, -2.0]),
        "bn.running_var": torch.tensor([1.5]),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    keep(tmp_path, 0, 0.5, a)
    keep(tmp_path, 4, 0.6, b)
    loaded = [load_checkpoint(top_k_path(tmp_path, e))["model_state"] for e in (0, 4)]
    mean = average_states(loaded)
    assert mean["w"].tolist() == [2.0, 0.0] and mean["w"].dtype == torch.float32
    assert mean["bn.running_var"].tolist() == [1.0]  # BatchNorm statistics averaged with the weights
    assert mean["bn.num_batches_tracked"].item() == 7  # counters: the latest epoch's
    with pytest.raises(ValueError, match="different keys"):
        average_states([a, {"w": a["w"]}])


def test_the_top_k_keep_the_best_scores_earlier_epochs_first_on_ties() -> None:
    top: list[tuple[int, float]] = []
    for epoch, score in enumerate([0.2, 0.5, math.nan, 0.5, 0.4, 0.6]):
        top = updated_top_k(top, epoch, score, 3)
    assert top == [(5, 0.6), (1, 0.5), (3, 0.5)]
    (first,) = updated_top_k([], 0, math.nan, 2)  # a NaN validation is kept while nothing beats it
    assert first[0] == 0 and math.isnan(first[1])
    assert [e for e, _ in updated_top_k([first], 1, 0.1, 2)] == [1, 0]  # and ranks below any number


def test_prune_removes_what_the_top_k_no_longer_names(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        keep(tmp_path, epoch, 0.1, {"w": torch.zeros(1)})
    prune(tmp_path, [(3, 0.2), (1, 0.1)])
    assert sorted(p.name for p in (tmp_path / TOP_DIR).iterdir()) == ["epoch0001.pt", "epoch0003.pt"]
