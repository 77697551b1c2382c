"""A check at the end of `Calibrator.run()` that the quantized model still computes what the
float model computes.

On the first sample of the first calibration batch (`SAMPLES`), the model runs once with
quantization on and once with it off; the outputs' floating-point tensors, flattened and
joined, give the cosine

    cos = ⟨y_q, y⟩ / (‖y_q‖·‖y‖).

A defect that breaks the quantized model (a lost SmoothQuant factor, a wrong first or last
layer, a model whose forward reads a weight we did not quantize as expected) shows here as
a cosine near 0, where a working 8-bit model gives > 0.99 (EfficientNet-Lite0 W4A8 with the
defaults 0.86; with every layer at min-max 4-bit weights and no bias correction, KL 3.5 on
held-out crops, 0.48).
Below `FAR`, or with non-finite quantized outputs, `QuantizedOutputWarning` says so; the
value is kept on the calibrator (`output_cosine`) and shown by `summary()`. It costs two
forwards of one sample (`benchmarks/README.md` measures it).
"""

from __future__ import annotations

import math
import warnings

import torch

from bridge.capture.data import Batch, CalibrationDataError, first_samples, run_model
from bridge.capture.tensors import tensors_in
from bridge.inplace.fakequant import quantization

SAMPLES = 1
FORWARDS = 2  # of `SAMPLES` each: quantization on, then off
FAR = 0.5


class QuantizedOutputWarning(UserWarning):
    """The quantized model's output is far from the float model's on a calibration sample."""


def output_cosine(model: torch.nn.Module, quantizers: dict, batch: Batch) -> float | None:
    """`cos` (module docstring) of the model's output with quantization on and off on
    `batch`; NaN where the quantized output is not finite; None where the output holds no
    floating-point tensor or the float output is all zeros."""
    with torch.no_grad():
        quantized = _flat(run_model(model, batch, 0))
        with quantization(quantizers, False):
            reference = _flat(run_model(model, batch, 0))
    if quantized is None or reference is None or quantized.shape != reference.shape:
        return None
    if not torch.isfinite(quantized).all():
        return math.nan
    if reference.norm() == 0:
        return None
    if quantized.norm() == 0:
        return 0.0
    return float(quantized @ reference / (quantized.norm() * reference.norm()))


def check_output(model: torch.nn.Module, quantizers: dict, batch: Batch) -> float | None:
    """`output_cosine` on the first `SAMPLES` of `batch` (the whole batch where the model
    rejects the cut one), with `QuantizedOutputWarning` below `FAR` or for NaN."""
    try:
        cos = output_cosine(model, quantizers, first_samples(batch, SAMPLES))
    except CalibrationDataError:
        cos = output_cosine(model, quantizers, batch)
    if cos is not None and not cos >= FAR:
        found = "non-finite values" if math.isnan(cos) else f"cosine {cos:.3f}"
        warnings.warn(
            f"the quantized model's output has {found} against the float model's on the first "
            f"calibration sample (below {FAR}: a working 8-bit model gives > 0.99). Look at "
            "Calibrator.sensitivity() for the layers that cost most, raise w_bit/a_bit, or keep "
            "layers float (disable_names)",
            QuantizedOutputWarning,
            stacklevel=3,
        )
    return cos


def _flat(out) -> torch.Tensor | None:
    parts = [t.detach().double().reshape(-1) for t in tensors_in(out) if t.is_floating_point()]
    return torch.cat(parts) if parts else None
