"""Accuracy keeping on a torch model: sample layer-input rows, run `jaxq.accuracy.keep_accuracy`.

Rows (`bridge.reconstruction.RowCapture`) come from the float model and, with
`recon_inputs="quantized"`, from the quantized model at the same positions. The chain
itself (EasyQuant → SQuant/AdaRound → bias correction) is pure JAX.
"""
from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

import jaxq
from bridge.context import Context, UncalibratedLayerError
from bridge.memory import COPIES_FLOAT_INPUTS, COPIES_QUANTIZED_INPUTS, budget_bytes, plan_row_groups, release_freed_memory
from bridge.record import LayerRecord, apply_records


class FunctionalLayerError(ValueError):
    """A row-based algorithm was asked for a layer that is only used functionally."""


def _sample_rows(ctx: Context, rows, check: bool, desc: str, keep_rows: bool):
    from bridge.reconstruction import RowCapture

    index = {n: i for i, n in enumerate(ctx.specs)}  # as in one pass over every layer, whatever the group
    capture = RowCapture({n: q.module for n, q in ctx.quantizers.items()}, ctx.specs, rows, ctx.cfg.seed,
                         check=check, keep_rows=keep_rows, batches=ctx.num_batches(), index=index)
    ctx.forward_all(capture, desc)
    return capture


def _check_rows_finite(rows: dict, what: str) -> None:
    for name, r in rows.items():
        if r is not None and not np.isfinite(r).all():
            raise FloatingPointError(f"layer {name!r}: its {what} input rows from calib_data contain NaN or Inf; "
                                     "check the data or the preceding layers")


def layer_rows(ctx: Context, float_weights, weights, act, rows_per_layer=None):
    """`({name: LayerRows}, {name: E[row]})` for the data-driven algorithms
    (`rows_per_layer`: row counts, default `cfg.recon_rows` each)."""
    count = rows_per_layer or ctx.cfg.recon_rows
    functional = [n for n, q in ctx.quantizers.items() if q.functional]
    if functional:
        raise FunctionalLayerError(
            f"layers {functional[:3]} are used through functional calls (attention, weights read directly), where "
            "easy_quant, adaround and bias_correction cannot sample their rows yet; keep them in float "
            "(disable_names) or switch those options off")
    needs_rows = ctx.cfg.keep_acc.needs_rows
    try:
        float_capture = _sample_rows(ctx, count, True, "jaxq sample rows (float)", keep_rows=needs_rows)
        mean_rows = float_capture.mean_rows()
    except RuntimeError as e:  # a layer never called
        raise UncalibratedLayerError(str(e)) from e
    _check_rows_finite(mean_rows, "mean")
    target = float_capture.result() if needs_rows else dict.fromkeys(ctx.quantizers)
    _check_rows_finite(target, "float")
    rows = target
    if ctx.cfg.recon_inputs == "quantized" and needs_rows:
        interim = {n: LayerRecord(np.asarray(weights[n].qparams.scale, np.float32),
                                  np.asarray(weights[n].qparams.offset, np.int32), np.asarray(weights[n].q, np.int32), True,
                                  None if act.get(n) is None else np.asarray(act[n].scale, np.float32),
                                  None if act.get(n) is None else np.asarray(act[n].offset, np.int32))
                   for n in ctx.quantizers}
        apply_records(ctx.quantizers, interim)
        for q in ctx.quantizers.values():
            q.quant_enabled = True
        try:
            rows = _sample_rows(ctx, count, False, "jaxq sample rows (quantized)", keep_rows=True).result()
        finally:
            for q in ctx.quantizers.values():
                q.quant_enabled = False
    release_freed_memory()  # the per-batch parts of the samples
    out = {}
    for name, q in ctx.quantizers.items():
        bias = q.float_bias
        out[name] = jaxq.accuracy.LayerRows(
            rows=rows[name], target=target[name],
            wg=np.asarray(jaxq.rows.grouped_weight(ctx.specs[name], float_weights[name])),
            bias=None if bias is None else bias.detach().float().cpu().numpy(),
            act=act.get(name), weight=weights[name].qparams)
    return out, mean_rows


def _row_floats(ctx: Context) -> dict[str, int]:
    """Floats per input row of each layer: `g·d` (`jaxq.rows`)."""
    out = {}
    for name, q in ctx.quantizers.items():
        shape = q.float_weight.shape
        out[name] = int(np.prod(shape[1:])) * (ctx.specs[name].groups if ctx.specs[name].kind != "linear" else 1)
    return out


def keep_accuracy(ctx: Context, float_weights, weights, act, timings: dict):
    """`(weights, act, corrections or None, reports)` after the chain `ctx.cfg` asks for,
    layer group by layer group within the memory budget (`bridge.memory`)."""
    cfg = ctx.cfg
    if cfg.keep_acc.needs_rows:
        copies = COPIES_QUANTIZED_INPUTS if cfg.recon_inputs == "quantized" else COPIES_FLOAT_INPUTS
        groups, per_layer = plan_row_groups(_row_floats(ctx), cfg.recon_rows, copies, budget_bytes(cfg.memory_budget))
    else:  # bias correction alone keeps only one mean row per layer
        groups, per_layer = [list(ctx.quantizers)], None
    weights, act, corrections, reports = dict(weights), dict(act), {}, {}
    for names in groups:
        sub = dataclasses.replace(ctx, quantizers={n: ctx.quantizers[n] for n in names})
        w, a, c, r = _keep_accuracy_group(sub, {n: float_weights[n] for n in names}, {n: weights[n] for n in names},
                                          {n: act[n] for n in names if n in act},
                                          None if per_layer is None else {n: per_layer[n] for n in names}, timings)
        release_freed_memory()  # the group's rows are gone
        weights.update(w)
        act.update(a)
        corrections.update(c or {})
        for algo, per in r.items():
            reports.setdefault(algo, {}).update(per)
    return weights, act, (corrections if cfg.bias_correction else None), reports


def _keep_accuracy_group(ctx: Context, float_weights, weights, act, rows_per_layer, timings: dict):
    t = time.perf_counter()
    rows, mean_rows = layer_rows(ctx, float_weights, weights, act, rows_per_layer)
    timings["sample_rows_s"] = timings.get("sample_rows_s", 0.0) + time.perf_counter() - t
    bars: dict = {}

    def progress(step: str, n: int) -> None:
        if step not in bars:
            for b in bars.values():
                b.close()
            bars[step] = ctx.bar(f"jaxq {step}", len(rows))
        bars[step].update(n)

    t = time.perf_counter()
    try:
        result = jaxq.accuracy.keep_accuracy(float_weights, weights, act, rows, mean_rows, ctx.cfg.keep_acc,
                                             ctx.cfg.bias_correction, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    timings["keep_accuracy_s"] = timings.get("keep_accuracy_s", 0.0) + time.perf_counter() - t
    corrections = None
    if result.corrections is not None:
        corrections = {n: np.asarray(d, np.float32) for n, d in result.corrections.items()}
        bad = [n for n, d in corrections.items() if not np.isfinite(d).all()]
        if bad:
            raise FloatingPointError(f"layer {bad[0]!r}: bias correction is not finite (NaN/Inf in its inputs)")
    return result.weights, result.act, corrections, result.reports


def bias_corrections_of(ctx: Context, records: dict[str, LayerRecord]) -> dict[str, np.ndarray]:
    """`δ = (W − Ŵ)·E[row]` for the weights in `records` (after block reconstruction chose
    new codes), `E[row]` from one float forward over the calibration data (quantization off)."""
    try:
        mean_rows = _sample_rows(ctx, ctx.cfg.recon_rows, True, "jaxq bias correction", keep_rows=False).mean_rows()
    except RuntimeError as e:  # a layer never called
        raise UncalibratedLayerError(str(e)) from e
    _check_rows_finite(mean_rows, "mean")
    grouped, quantized = {}, {}
    for name, q in ctx.quantizers.items():
        rec = records[name]
        grouped[name] = jaxq.rows.grouped_weight(ctx.specs[name], jnp.asarray(q.float_weight.detach().float().cpu().numpy()))
        quantized[name] = jaxq.QuantizedWeight(jaxq.QParams(jnp.asarray(rec.weight_scale), jnp.asarray(rec.weight_offset),
                                                            q.weight_scheme), jnp.asarray(rec.codes))
    corrections = jaxq.accuracy.bias_corrections(mean_rows, grouped, quantized)
    out = {n: np.asarray(d, np.float32) for n, d in corrections.items()}
    bad = [n for n, d in out.items() if not np.isfinite(d).all()]
    if bad:
        raise FloatingPointError(f"layer {bad[0]!r}: bias correction is not finite (NaN/Inf in its inputs)")
    return out
