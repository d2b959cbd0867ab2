"""How merged probabilities become labels: per-class scales (calibration), argmax, component rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.data.geometry import resize_argmax
from pipeline.ensemble.postprocess import ClassRule, apply_rules, rules_from_json, rules_to_json


@dataclass(frozen=True)
class LabelDecision:
    """What the ensemble stage decided on the OOF predictions besides the weights (default: plain argmax)."""

    class_scales: list[float] | None = None  # one per class (background's 1); None: no calibration
    rules: list[ClassRule] = field(default_factory=list)  # one per class; empty: no post-processing

    def labels(self, probs: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """(C, h, w) merged probabilities -> uint8 (H, W) labels at `size` = (H, W): scaled per class,
        resized bilinearly, argmax, then the rules. Scaling a class commutes with the resize (linear)."""
        if self.class_scales is not None:
            scales = torch.tensor(self.class_scales, dtype=probs.dtype, device=probs.device)
            probs = probs * scales[:, None, None]
        labels = resize_argmax(probs, size).cpu().numpy()
        return apply_rules(labels, self.rules) if self.rules else labels

    def to_json(self, classes: Sequence[str]) -> dict[str, Any]:
        return {
            "class_scales": None
            if self.class_scales is None
            else dict(zip(classes, self.class_scales, strict=True)),
            "postprocess": rules_to_json(self.rules, classes) if self.rules else {},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], classes: Sequence[str]) -> LabelDecision:
        """`to_json`'s dict back; a malformed one raises ValueError, KeyError or TypeError."""
        scales = raw["class_scales"]
        if scales is not None:
            if list(scales) != list(classes):
                raise ValueError(f"class scales for {list(scales)}, not the classes {list(classes)}")
            scales = [float(scales[name]) for name in classes]
            if not all(s > 0 for s in scales):
                raise ValueError("class scales must be positive")
        rules = rules_from_json(dict(raw["postprocess"]), classes)
        return cls(scales, rules if any(rule.active for rule in rules) else [])
