"""Evaluation protocols of docs/evaluation.md: model, calibration data, held-out data, metric.

A protocol gives a fresh float model, the calibration batches, the float reference on the
evaluation set and `evaluate(model) -> {metric: value}`. Tests and `benchmarks/` use the
same protocols, so their numbers agree. `held_out` shrinks the evaluation set (the first
`held_out` samples of it) for quick studies; the default is the protocol's full set, the one
every number in the docs and tests uses.

- digits:  DigitsCNN, 256 training digits (8 batches of 32) → test top-1 over 450 digits.
- efficientnet_lite0:  32 crops (seed 1, batches of 8) → agreement with FP32 and
  mean KL(FP32 ‖ quant) over 128 crops (seed 2).
- minilm:  64 passages (one per batch: no padding tokens enter the statistics) → mean
  and minimum cosine between FP32 and quantized sentence embeddings over 256 others.

`calibration_subset(protocol, k)` gives another draw of calibration data for error bars
(k = 0: the protocol's own): EfficientNet-Lite0 crops of seed k, MiniLM 64 passages drawn
with seed k from those after the evaluation set, never the evaluated ones.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from bridge.evaluation import metrics, zoo


@dataclass
class Protocol:
    name: str
    make_model: Callable[[], torch.nn.Module]
    calib_data: list
    evaluate: Callable[[torch.nn.Module], dict]
    reference: dict = field(default_factory=dict)

    def fp_forward_seconds(self) -> float:
        """Float forward time over the calibration data: the floor for calibration."""
        model = self.make_model()
        with torch.no_grad():
            _run_all(model, self.calib_data[:1])  # warm-up
            t0 = time.perf_counter()
            _run_all(model, self.calib_data)
        return time.perf_counter() - t0


def _run_all(model, batches):
    for b in batches:
        model(**b) if isinstance(b, dict) else model(*b) if isinstance(b, (tuple, list)) else model(b)


def _held_out(n, full: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= full:
        raise ValueError(
            f"held_out={n!r}: expected an int in [1, {full}] (the protocol's evaluation set has {full} samples)"
        )
    return n


@functools.lru_cache(maxsize=None)
def digits(held_out: int = 450) -> Protocol:
    from bridge.models.digits import accuracy, digits_split, load_digits_cnn

    x_train, _, x_test, y_test = digits_split()
    x_test, y_test = x_test[: _held_out(held_out, 450)], y_test[:held_out]
    calib = [x_train[i : i + 32] for i in range(0, 256, 32)]
    p = Protocol("digits", load_digits_cnn, calib, lambda m: {"top1": accuracy(m, x_test, y_test)})
    p.reference = p.evaluate(load_digits_cnn())
    return p


@functools.lru_cache(maxsize=None)
def efficientnet_lite0(held_out: int = 128) -> Protocol:
    calib = zoo.image_crops(32, seed=1)
    evaluation = zoo.image_crops(128, seed=2)[: _held_out(held_out, 128)]
    fp_logits = metrics.logits(zoo.efficientnet_lite0(), evaluation)

    def evaluate(model):
        agree, kl = metrics.agreement_and_kl(fp_logits, metrics.logits(model, evaluation))
        return {"agreement": agree, "kl": kl}

    p = Protocol("efficientnet_lite0", zoo.efficientnet_lite0, [calib[i : i + 8] for i in range(0, 32, 8)], evaluate)
    p.reference = {"agreement": 1.0, "kl": 0.0}
    return p


@functools.lru_cache(maxsize=None)
def efficientnet_lite0_unseen(calib_crops: int = 64, held_out: int = 128) -> Protocol:
    """EfficientNet-Lite0 for methods that learn from the calibration data (docs/evaluation.md §1):
    calibrated on crops of five photos (`zoo.CALIBRATION_PHOTOS`), evaluated on crops of
    the three others (`zoo.UNSEEN_PHOTOS`), so overfitting the photos shows."""
    if not isinstance(calib_crops, int) or not 8 <= calib_crops <= 256 or calib_crops % 8:
        raise ValueError(f"calib_crops={calib_crops!r}: expected a multiple of 8 in [8, 256]")
    calib = zoo.image_crops(calib_crops, seed=1, which=zoo.CALIBRATION_PHOTOS)
    evaluation = zoo.image_crops(128, seed=2, which=zoo.UNSEEN_PHOTOS)[: _held_out(held_out, 128)]
    fp_logits = metrics.logits(zoo.efficientnet_lite0(), evaluation)

    def evaluate(model):
        agree, kl = metrics.agreement_and_kl(fp_logits, metrics.logits(model, evaluation))
        return {"agreement": agree, "kl": kl}

    p = Protocol(
        "efficientnet_lite0_unseen",
        zoo.efficientnet_lite0,
        [calib[i : i + 8] for i in range(0, calib_crops, 8)],
        evaluate,
    )
    p.reference = {"agreement": 1.0, "kl": 0.0}
    return p


@functools.lru_cache(maxsize=None)
def minilm(held_out: int = 256) -> Protocol:
    tokenizer, model = zoo.minilm()
    passages = zoo.text_passages()
    calib = zoo.text_batches(tokenizer, passages[:64], batch_size=1)
    evaluation = zoo.text_batches(tokenizer, passages[64 : 64 + _held_out(held_out, 256)], batch_size=16)
    fp = metrics.sentence_embeddings(model, evaluation)

    def evaluate(m):
        mean, low = metrics.cosine_stats(fp, metrics.sentence_embeddings(m, evaluation))
        return {"mean_cos": mean, "min_cos": low}

    p = Protocol("minilm", lambda: zoo.minilm()[1], calib, evaluate)
    p.reference = {"mean_cos": 1.0, "min_cos": 1.0}
    return p


MINILM_EVALUATED = 64 + 256  # passages[:64] calibrate, passages[64:320] are evaluated


def minilm_calibration_passages(subset: int) -> list[str]:
    """MiniLM's calibration passages of draw `subset`: its own 64 for 0, else 64 drawn with
    seed `subset` from the passages after the evaluated ones (the documentation repeats some
    sections word for word: a passage equal to an evaluated one is not drawn)."""
    passages = zoo.text_passages()
    if subset == 0:
        return passages[:64]
    evaluated = set(passages[64:MINILM_EVALUATED])
    rest = [t for t in passages[MINILM_EVALUATED:] if t not in evaluated]
    picked = np.random.default_rng(subset).choice(len(rest), size=64, replace=False)
    return [rest[i] for i in sorted(picked)]


def calibration_subset(protocol: Protocol, subset: int) -> list:
    """The calibration batches of draw `subset` of `protocol` (module docstring); 0 is its own."""
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 0:
        raise ValueError(f"subset={subset!r}: an int ≥ 0 (0: the protocol's own calibration data)")
    if subset == 0:
        return protocol.calib_data
    if protocol.name == "minilm":
        tokenizer, _ = zoo.minilm()
        return zoo.text_batches(tokenizer, minilm_calibration_passages(subset), batch_size=1)
    if protocol.name in ("efficientnet_lite0", "efficientnet_lite0_unseen"):
        if protocol.name == "efficientnet_lite0" and subset == 2:
            raise ValueError("efficientnet_lite0: crop seed 2 is its evaluation set; use another subset")
        n = sum(int(b.shape[0]) for b in protocol.calib_data)
        which = zoo.CALIBRATION_PHOTOS if protocol.name.endswith("unseen") else None
        crops = zoo.image_crops(n, seed=subset, which=which)
        return [crops[i : i + 8] for i in range(0, n, 8)]
    raise ValueError(f"protocol {protocol.name!r} has no calibration subsets; use subset 0")


PROTOCOLS = {
    "digits": digits,
    "efficientnet_lite0": efficientnet_lite0,
    "minilm": minilm,
    "efficientnet_lite0_unseen": efficientnet_lite0_unseen,
}
