"""Observer states of every layer's input: the `activations` step of the pipeline
(`bridge.pipeline`) and `Calibrator.activation_histograms`.

Torch forwards with hooks (`bridge.capture.activations`), or with a mesh the model lowered to JAX and
run data-parallel (`bridge.jax_model.observe`). The model is read with quantization off.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

import jaxq
from bridge.capture.activations import ActivationCapture
from bridge.capture.context import Context, UncalibratedLayerError
from bridge.capture.data import iter_batches
from bridge.capture.activations import check_finite
from jaxq.observer_choice import histogram_observer_for, observer_for


def capture_states(ctx: Context, observer: jaxq.Observer, layers: dict | None = None, beside=None) -> dict:
    """Observer state of every layer's input over the calibration data: torch forwards with
    hooks, or with `ctx.mesh` the lowered model data-parallel over the mesh. `beside`: another
    capture (a context manager) that listens in the same torch forwards."""
    layers = layers if layers is not None else ctx.quantizers
    if ctx.mesh is not None:
        from bridge.jax_model.observe import observe_inputs

        with ctx.bar("jaxq calibrate (mesh)", ctx.num_batches(), unit="batch") as bar:
            return observe_inputs(
                ctx.model, layers, iter_batches(ctx.calib_data, ctx.device), observer, ctx.mesh, progress=bar.update
            )
    capture = ActivationCapture(layers, observer)
    with contextlib.ExitStack() as hooks:
        if beside is not None:
            hooks.enter_context(beside)
        ctx.forward_all(capture, "jaxq calibrate", after_batch=capture.flush)
    return capture.states


def check_activations(results: dict[str, jaxq.ActivationResult]) -> None:
    """Raise naming the layer: a NaN/Inf input (and its batch), or never reached by the data."""
    check_finite(results)
    for name, r in results.items():
        scale = np.asarray(r.qparams.scale)
        if not np.all(np.isfinite(scale)):
            raise UncalibratedLayerError(
                f"layer {name!r} was never called on the calibration data, so its input range is unknown; give "
                f"calib_data that reaches it, or keep it in float: QuantConfig(disable_names=[..., {name!r}])"
            )


class ClippedNegativeInputsWarning(UserWarning):
    """Layers whose inputs go negative, quantized on an unsigned symmetric grid `[0, 2^b − 1]·s`."""


CLIPPED_SHARE = 0.01  # a negative minimum below −1 % of the maximum is named


def warn_clipped_negatives(results: dict[str, jaxq.ActivationResult], schemes: dict[str, jaxq.QScheme]) -> None:
    """Warn, naming the layers, where an unsigned symmetric input grid (`a_signed=False`,
    `a_sym=True`: offset 0) clips a negative input range to 0 — right after a ReLU, a
    silent loss of every negative value anywhere else."""
    clipped = {}
    for name, r in results.items():
        scheme = schemes[name]
        lo, hi = float(np.asarray(r.lo)), float(np.asarray(r.hi))
        if not scheme.signed and scheme.symmetric and lo < -CLIPPED_SHARE * max(hi, 0.0):
            clipped[name] = lo
    if clipped:
        shown = ", ".join(f"{n!r} (min {lo:.3g})" for n, lo in list(clipped.items())[:5])
        more = f" and {len(clipped) - 5} more" if len(clipped) > 5 else ""
        warnings.warn(
            f"{len(clipped)} of {len(results)} layers take negative inputs, which a_signed=False with a_sym=True "
            f"quantizes to 0 (the grid is [0, 2^a_bit − 1]·scale): {shown}{more}. Use a_sym=False (an offset) "
            "or a_signed=True, or keep these layers float (disable_names)",
            ClippedNegativeInputsWarning,
            stacklevel=3,
        )


def activation_qparams(ctx: Context, beside=None) -> dict[str, jaxq.QParams]:
    """Every layer's input quantizer from the observer `cfg` names (`beside`: `capture_states`)."""
    observer = observer_for(ctx.cfg, ctx.num_batches())
    states = capture_states(ctx, observer, beside=beside)
    results = {}
    for scheme, names in _by_act_scheme(ctx.cfg, states).items():
        # the states do not depend on the bits; the histogram's range search does (its levels)
        finalize = (
            observer
            if scheme.bits == ctx.cfg.a_bit
            else observer_for(ctx.cfg.replace(a_bit=scheme.bits), ctx.num_batches())
        )
        results.update(jaxq.finalize_activations({n: states[n] for n in names}, finalize, scheme))
    results = {n: results[n] for n in states}
    check_activations(results)
    warn_clipped_negatives(results, {n: ctx.cfg.act_scheme_for(n) for n in results})
    return {n: r.qparams for n, r in results.items()}


def _by_act_scheme(cfg, names) -> dict:
    """Layer names grouped by their input quantizer (`layer_act_bits`)."""
    out: dict = {}
    for n in names:
        out.setdefault(cfg.act_scheme_for(n), []).append(n)
    return out


def histograms(ctx: Context, bins: int | None) -> dict:
    return capture_states(ctx, histogram_observer_for(ctx.cfg, bins))
