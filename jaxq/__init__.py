"""jaxq: pure-JAX post-training quantization core (never imports torch).

q = clamp(round(x · (1/s)) + o, qmin, qmax),   x̂ = (q − o) · s
"""

from jaxq.calibrate import (
    ActivationResult,
    QuantizedWeight,
    compile_count,
    finalize_activations,
    quantize_weight,
    quantize_weights,
    update_observer,
    update_observers,
    update_observers_of_size,
    update_stacked_observers,
)
from jaxq.config import KeepAcc, QuantConfig
from jaxq.histogram import HistogramState, histogram_observer, l2_optimal_bins
from jaxq.layers import LayerSpec, apply
from jaxq.numerics import dequantize, fake_quant, quantize
from jaxq.observers import (
    Observer,
    batch_percentile_minmax,
    channel_minmax,
    running_minmax,
    sigma_statistic,
)
from jaxq.qparams import QParams, qparams_from_range
from jaxq.scheme import QScheme
from jaxq import accuracy, keep_acc, pipeline, rows, sweep
from jaxq.adaround import AdaRoundParams

__version__ = "0.1.0"

__all__ = [
    "AdaRoundParams",
    "ActivationResult",
    "accuracy",
    "keep_acc",
    "pipeline",
    "rows",
    "HistogramState",
    "histogram_observer",
    "l2_optimal_bins",
    "KeepAcc",
    "LayerSpec",
    "Observer",
    "QParams",
    "QScheme",
    "QuantConfig",
    "QuantizedWeight",
    "apply",
    "batch_percentile_minmax",
    "channel_minmax",
    "compile_count",
    "dequantize",
    "fake_quant",
    "finalize_activations",
    "qparams_from_range",
    "quantize",
    "quantize_weight",
    "quantize_weights",
    "running_minmax",
    "sigma_statistic",
    "sweep",
    "update_observer",
    "update_observers",
    "update_observers_of_size",
    "update_stacked_observers",
]
