"""Layer-input rows for the row-reading steps of the pipeline (`jaxq.pipeline`).

Rows (`bridge.capture.row_capture.RowCapture`) come from the float model and, with
`recon_inputs="quantized"`, from the quantized model at the same positions; mean rows
(`E[row]` over every position) come from the float model in the same pass.
"""

from __future__ import annotations


import numpy as np

import jaxq
from jaxq.host import aligned_copy
from bridge.capture.context import Context, UncalibratedLayerError
from bridge.capture.memory import release_freed_memory
from bridge.inplace.fakequant import quantization
from bridge.inplace.record import LayerRecord, apply_records, smoothing_of, weight_params


class FunctionalLayerError(ValueError):
    """A row-based algorithm was asked for a layer that is only used functionally."""


def row_capture(ctx: Context, rows, check: bool, keep_rows: bool):
    """A `RowCapture` of `ctx`'s layers (not entered), seeded as one pass over every layer."""
    from bridge.capture.row_capture import RowCapture

    index = {n: i for i, n in enumerate(ctx.specs)}  # as in one pass over every layer, whatever the group
    return RowCapture(
        {n: q.module for n, q in ctx.quantizers.items()},
        ctx.specs,
        rows,
        ctx.cfg.seed,
        check=check,
        keep_rows=keep_rows,
        batches=ctx.num_batches(),
        index=index,
    )


def sample_rows(ctx: Context, rows, check: bool, desc: str, keep_rows: bool):
    capture = row_capture(ctx, rows, check, keep_rows)
    ctx.forward_all(capture, desc)
    return capture


def check_mean_rows_possible(ctx: Context) -> None:
    """`FunctionalLayerError` naming the layers used only through functional calls."""
    functional = [n for n, q in ctx.quantizers.items() if q.functional]
    if functional:
        raise FunctionalLayerError(
            f"layers {functional[:3]} are used through functional calls (attention, weights read directly), where "
            "bias_correction cannot sample their rows yet; keep them in float (disable_names) or switch it off"
        )


def finished_mean_rows(capture) -> dict[str, np.ndarray]:
    """The mean rows of a finished capture, checked (never-called layers, NaN/Inf named)."""
    try:
        mean_rows = capture.mean_rows()
    except RuntimeError as e:  # a layer never called
        raise UncalibratedLayerError(str(e)) from e
    check_rows_finite(mean_rows, "mean")
    return mean_rows


def check_rows_finite(rows: dict, what: str) -> None:
    for name, r in rows.items():
        if r is not None and not np.isfinite(r).all():
            raise FloatingPointError(
                f"layer {name!r}: its {what} input rows from calib_data contain NaN or Inf; "
                "check the data or the preceding layers"
            )


def layer_rows(ctx: Context, float_weights, weights, act, rows_per_layer=None, needs_rows: bool = True, rows_read=None):
    """`({name: LayerRows}, {name: E[row]})` for the data-driven algorithms
    (`rows_per_layer`: row counts, default `cfg.recon_rows` each; `needs_rows=False`: the
    mean rows only, `LayerRows.rows` None; `rows_read`: keep only the first that many of
    each layer's sampled rows — the same rows the steps would read of them all)."""
    count = rows_per_layer or ctx.cfg.recon_rows
    functional = [n for n, q in ctx.quantizers.items() if q.functional]
    if functional:
        raise FunctionalLayerError(
            f"layers {functional[:3]} are used through functional calls (attention, weights read directly), where "
            "easy_quant, adaround, gptq and bias_correction cannot sample their rows yet; keep them in float "
            "(disable_names) or switch those options off"
        )
    try:
        float_capture = sample_rows(ctx, count, True, "jaxq sample rows (float)", keep_rows=needs_rows)
        mean_rows = float_capture.mean_rows()
    except RuntimeError as e:  # a layer never called
        raise UncalibratedLayerError(str(e)) from e
    check_rows_finite(mean_rows, "mean")
    target = _first(float_capture.result(), rows_read) if needs_rows else dict.fromkeys(ctx.quantizers)
    check_rows_finite(target, "float")
    rows = target
    if ctx.cfg.recon_inputs == "quantized" and needs_rows:
        interim = {
            n: LayerRecord(
                *weight_params(q, weights[n].qparams),
                np.asarray(weights[n].q, np.int32),
                True,
                None if act.get(n) is None else np.asarray(act[n].scale, np.float32),
                None if act.get(n) is None else np.asarray(act[n].offset, np.int32),
                smoothing=smoothing_of(q),  # records replace the factors: keep the ones set
            )
            for n, q in ctx.quantizers.items()
        }
        apply_records(ctx.quantizers, interim)
        with quantization(ctx.quantizers, True):
            rows = _first(
                sample_rows(ctx, count, False, "jaxq sample rows (quantized)", keep_rows=True).result(), rows_read
            )
    release_freed_memory()  # the per-batch parts of the samples
    out = {}
    for name, q in ctx.quantizers.items():
        bias = q.float_bias
        out[name] = jaxq.accuracy.LayerRows(
            rows=rows[name],
            target=target[name],
            wg=np.asarray(jaxq.rows.grouped_weight(ctx.specs[name], float_weights[name])),
            bias=None if bias is None else bias.detach().float().cpu().numpy(),
            act=act.get(name),
            weight=weights[name].qparams,
        )
    return out, mean_rows


def _first(rows: dict[str, np.ndarray], count: int | None) -> dict[str, np.ndarray]:
    """The first `count` rows of each layer, copied (aligned, `jaxq.host`) so that the rest is freed."""
    if count is None:
        return rows
    return {n: r if r.shape[0] <= count else aligned_copy(r[:count]) for n, r in rows.items()}


def row_floats(ctx: Context) -> dict[str, int]:
    """Floats per input row of each layer: `g·d` (`jaxq.rows`)."""
    out = {}
    for name, q in ctx.quantizers.items():
        shape = q.float_weight.shape
        out[name] = int(np.prod(shape[1:])) * (ctx.specs[name].groups if ctx.specs[name].kind != "linear" else 1)
    return out


def mean_rows_of(ctx: Context) -> dict[str, np.ndarray]:
    """`E[row]` per layer from one float forward over the calibration data (quantization off)."""
    check_mean_rows_possible(ctx)
    with quantization(ctx.quantizers, False):
        return finished_mean_rows(sample_rows(ctx, ctx.cfg.recon_rows, True, "jaxq mean rows", keep_rows=False))
