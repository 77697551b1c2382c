"""One calibration: capture → observers → weight quantizers → accuracy keeping → records.

`calibrate(ctx)` returns the parameter record of every quantized layer
(`bridge.record.LayerRecord`), the accuracy-keeping reports and timings. It reads the
model (quantization off) and writes nothing into it: the facade applies the records.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings

import numpy as np

import jaxq
from bridge.capture import ActivationCapture
from bridge.context import Context, UncalibratedLayerError
from bridge.data import iter_batches
from bridge.capture import check_finite
from bridge.keep_acc import FunctionalLayerError, keep_accuracy
from bridge.memory import release_freed_memory
from bridge.reconstruction import LayerGeometryError
from bridge.record import LayerRecord, is_nearest
from bridge.smoothing import smooth
from bridge.tensors import to_jax
from jaxq.observer_choice import histogram_observer_for, observer_for


def capture_states(ctx: Context, observer: jaxq.Observer, layers: dict | None = None) -> dict:
    """Observer state of every layer's input over the calibration data: torch forwards with
    hooks, or with `ctx.mesh` the lowered model data-parallel over the mesh."""
    layers = layers if layers is not None else ctx.quantizers
    if ctx.mesh is not None:
        from bridge.jax_model.observe import observe_inputs

        with ctx.bar("jaxq calibrate (mesh)", ctx.num_batches(), unit="batch") as bar:
            return observe_inputs(ctx.model, layers, iter_batches(ctx.calib_data, ctx.device), observer, ctx.mesh,
                                  progress=bar.update)
    capture = ActivationCapture(layers, observer)
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
                f"calib_data that reaches it, or keep it in float: QuantConfig(disable_names=[..., {name!r}])")


def activation_qparams(ctx: Context) -> dict[str, jaxq.QParams]:
    observer = observer_for(ctx.cfg, ctx.num_batches())
    states = capture_states(ctx, observer)
    results = jaxq.finalize_activations(states, observer, ctx.cfg.act_scheme)
    check_activations(results)
    return {n: r.qparams for n, r in results.items()}


def histograms(ctx: Context, bins: int | None) -> dict:
    return capture_states(ctx, histogram_observer_for(ctx.cfg, bins))


def _float_weights(ctx: Context) -> dict:
    return {n: to_jax(q.float_weight.float()) for n, q in ctx.quantizers.items()}


def calibrate(ctx: Context) -> tuple[dict[str, LayerRecord], dict, dict]:
    """`(records, reports, timings)` of every quantized layer (model left in float)."""
    cfg, ka = ctx.cfg, ctx.cfg.keep_acc
    t0 = time.perf_counter()
    smoothing = smooth(ctx) if cfg.smooth_quant else None
    act = activation_qparams(ctx) if cfg.act_quant else {}
    release_freed_memory()  # the observed forwards' activations
    t1 = time.perf_counter()
    float_weights = _float_weights(ctx)
    _check_weights(float_weights)
    weights = {}
    with ctx.bar("jaxq admm", len(float_weights)) if ka.admm[0] else contextlib.nullcontext() as bar:
        for scheme, names in _by_scheme(ctx).items():  # one group unless cfg.layer_bits sets other widths
            group = {n: float_weights[n] for n in names}
            if ka.admm[0]:
                weights.update(jaxq.accuracy.admm_weights(group, scheme, ka.admm[1], bar.update))
            else:
                weights.update(jaxq.quantize_weights(group, scheme))
    weights = {n: weights[n] for n in float_weights}
    timings = {"activations_s": t1 - t0, "weights_s": time.perf_counter() - t1}
    reports: dict = {}
    corrections = None
    if ka.easy_quant[0] or ka.round_opt or ka.adaround[0] or cfg.bias_correction:
        weights, act, corrections, reports = _keep_accuracy(ctx, float_weights, weights, act, timings)
    if smoothing is not None:
        reports["smooth_quant"] = smoothing
    nearest = not (ka.round_opt or ka.adaround[0])
    records = {n: _record(ctx, n, weights[n], act.get(n), None if corrections is None else corrections[n], nearest)
               for n in ctx.quantizers}
    return records, reports, timings


class BiasCorrectionSkipped(UserWarning):
    """Bias correction, on by default, could not run on this model and was left out."""


def _keep_accuracy(ctx: Context, float_weights, weights, act, timings: dict):
    """`keep_accuracy`; when bias correction is only on by default, a model whose layers
    it cannot sample (functional use, a forward its geometry does not describe) is
    calibrated without it, with a `BiasCorrectionSkipped` warning naming the layer."""
    try:
        return keep_accuracy(ctx, float_weights, weights, act, timings)
    except (FunctionalLayerError, LayerGeometryError) as e:
        if not ctx.default_bias_correction:
            raise
        warnings.warn(f"bias correction (on by default with real calibration data) is left out: {e}. "
                      "QuantConfig(bias_correction=False) says so explicitly", BiasCorrectionSkipped, stacklevel=2)
        ka = ctx.cfg.keep_acc
        reports = {"bias_correction_skipped": str(e)}
        if not (ka.easy_quant[0] or ka.round_opt or ka.adaround[0]):
            return weights, act, None, reports
        plain = dataclasses.replace(ctx, cfg=ctx.cfg.replace(bias_correction=False))
        weights, act, corrections, more = keep_accuracy(plain, float_weights, weights, act, timings)
        return weights, act, corrections, {**more, **reports}


def _by_scheme(ctx: Context) -> dict:
    groups: dict = {}
    for name, q in ctx.quantizers.items():
        groups.setdefault(q.weight_scheme, []).append(name)
    return groups


def _check_weights(float_weights: dict) -> None:
    for name, w in float_weights.items():
        if not bool(np.isfinite(np.asarray(w)).all()):
            raise FloatingPointError(f"layer {name!r}: its weight contains NaN or Inf; fix the model or keep it in "
                                     "float (disable_names)")


def _record(ctx: Context, name: str, w: jaxq.QuantizedWeight, act: jaxq.QParams | None, correction, nearest: bool):
    q = ctx.quantizers[name]
    codes = np.asarray(w.q).astype(np.int32)
    scale, offset = np.asarray(w.qparams.scale, np.float32), np.asarray(w.qparams.offset, np.int32)
    custom = not nearest and not is_nearest(np.asarray(q.float_weight.detach().float().cpu()), scale, offset,
                                            q.weight_scheme, codes)
    return LayerRecord(
        weight_scale=scale, weight_offset=offset, codes=codes, custom_codes=custom,
        input_scale=None if act is None else np.asarray(act.scale, np.float32),
        input_offset=None if act is None else np.asarray(act.offset, np.int32),
        bias_correction=None if correction is None else np.asarray(correction, np.float32),
        smoothing=None if q.smoothing is None else q.smoothing.detach().cpu().numpy().astype(np.float32),
    )
