"""Accuracy you can ask for: fall back the fewest layers so that the user's own metric
drops at most `max_drop` from the float model's (NNCF's accuracy control, for torch).

Layers fall back in a given order, most sensitive first (`Calibrator.sensitivity`). With
the drop taken as non-increasing in the number of fallen-back layers, the fewest that
meet `max_drop` are found by bisection: about `log₂(layers) + 2` calls of `validate`,
each on the torch model with quantization switched off for the fallen-back layers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from bridge.inplace.fakequant import quantization, set_quantization


@dataclasses.dataclass
class AccuracyControlReport:
    """The float score, the scores measured with the first `k` layers of `order` in
    float, and the `k` chosen (−1: even all of them in float misses `max_drop`)."""

    reference: float
    max_drop: float
    higher_is_better: bool
    order: list[str]
    scores: dict[int, float]
    chosen: int

    def drop(self, k: int) -> float:
        s = self.scores[k]
        return self.reference - s if self.higher_is_better else s - self.reference

    def __str__(self) -> str:
        lines = [
            f"float score {self.reference:.5g}, allowed drop {self.max_drop:g}",
            f"{'k':>4}  {'score':>10}  {'drop':>10}  last layer in float",
        ]
        for k in sorted(self.scores):
            mark = "  ← chosen" if k == self.chosen else ""
            name = "-" if k == 0 else self.order[k - 1]
            lines.append(f"{k:>4}  {self.scores[k]:>10.5g}  {self.drop(k):>10.4g}  {name}{mark}")
        return "\n".join(lines)


def _score(validate: Callable, model: nn.Module, where: str) -> float:
    value = validate(model)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"validate(model) must return a number (the model's score); it returned {value!r} {where}"
        ) from None
    if score != score or score in (float("inf"), float("-inf")):
        raise ValueError(
            f"validate(model) returned {score} {where}; a score must be finite (a NaN usually means the "
            "validation data or the metric divides by zero)"
        )
    return score


def accuracy_control(
    model: nn.Module, layers: dict, validate: Callable, max_drop: float, order: list[str], higher_is_better: bool = True
) -> AccuracyControlReport:
    """Scores of `model` with its quantized `layers` switched as the search needs (each
    layer's `quant_enabled` is restored afterwards)."""
    if not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise ValueError(f"max_drop={max_drop!r}: expected a number ≥ 0 (in the units of validate's score)")
    before = {n: q.quant_enabled for n, q in layers.items()}

    def with_float(names) -> None:
        off = set(names)
        set_quantization(layers, lambda n: before[n] and n not in off)

    with quantization(layers, before.__getitem__):
        with_float(layers)
        report = AccuracyControlReport(
            _score(validate, model, "on the float model"), float(max_drop), higher_is_better, list(order), {}, -1
        )

        def ok(k: int) -> bool:
            if k not in report.scores:
                with_float(order[:k])
                report.scores[k] = _score(validate, model, f"with {k} layers in float")
            return report.drop(k) <= max_drop

        if ok(0):
            report.chosen = 0
        elif ok(len(order)):
            lo, hi = 0, len(order)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if ok(mid) else (mid, hi)
            report.chosen = hi
        return report
