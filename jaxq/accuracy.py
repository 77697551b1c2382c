"""Accuracy keeping over many layers: each algorithm once per bucket of equal shapes.

    admm_weights       per-channel scale refinement           (`jaxq.admm`)
    squant_weights     data-free rounding                     (`jaxq.squant`)
    easy_quant_layers  activation + weight scale search       (`jaxq.easyquant`)
    adaround_layers    learned rounding                       (`jaxq.adaround`)
    gptq_layers        rounding with error feedback           (`jaxq.gptq`)
    bias_corrections   mean output shift of the final weights (`jaxq.bias_correction`)
    LAYER_STEPS        the layer-local steps of `jaxq.pipeline.plan` as pure functions
                       `(float weights, LayerState, settings, progress) → (LayerState, report)`

The data-driven ones take a `LayerRows` per layer: calibration rows (`jaxq.rows`), the
grouped float weight, bias, and the current quantizers.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.adaround import AdaRoundParams, AdaRoundResult, Moments, RowFactor, adaround_bucket, moment_sum, row_moments
from jaxq.admm import admm_quantize_bucket
from jaxq.bias_correction import bias_shift_bucket
from jaxq.calibrate import QuantizedWeight, map_buckets, map_rows
from jaxq.easyquant import ROWS_USED, EasyQuantResult, easy_quant_bucket
from jaxq.executables import cached_jit
from jaxq.gptq import GptqParams, Problem, solve_problems
from jaxq.numerics import dequantize, quantize
from jaxq.padding import power_of_two
from jaxq.qparams import QParams
from jaxq.scheme import QScheme
from jaxq.sharding import bind
from jaxq.squant import squant_round_bucket


class LayerRows(NamedTuple):
    """One layer's reconstruction problem: the quantized model's input rows `[m, g, d]`
    (before the activation quantizer), the float model's rows at the same positions,
    weight `[g, out/g, d]`, bias `[out]` or None, activation quantizer (None = float
    input), weight quantizer."""

    rows: jax.Array
    target: jax.Array
    wg: jax.Array
    bias: jax.Array | None
    act: QParams | None
    weight: QParams


def admm_weights(
    weights: Mapping[str, jax.Array], scheme: QScheme, iters: int, progress=None, weight_range: str = "minmax"
) -> dict[str, QuantizedWeight]:
    """ADMM-refined per-channel quantizers of many weights, each from its `weight_range` start."""
    return map_buckets(
        bind(admm_quantize_bucket, scheme=scheme, iters=iters, weight_range=weight_range), weights, progress
    )


def _squant_bucket(t):
    return squant_round_bucket(*t)


def squant_weights(
    weights: Mapping[str, jax.Array], quantized: Mapping[str, QuantizedWeight], progress=None
) -> dict[str, QuantizedWeight]:
    """SQuant codes for many weights under their current quantizers."""
    inputs = {n: (weights[n], quantized[n].qparams) for n in weights}
    codes = map_buckets(_squant_bucket, inputs, progress)
    return {n: QuantizedWeight(quantized[n].qparams, codes[n]) for n in weights}


# rows of equal-shaped layers stacked into one EasyQuant call: XLA's temporaries are a few
# times the rows (simulated rows for the weight search, the held-out check), so a bucket of
# the largest depthwise layers runs a few at a time
EASY_QUANT_BUCKET_BYTES = 128 << 20


def easy_quant_layers(
    layers: Mapping[str, LayerRows], candidates: int, rounds: int = 2, progress=None
) -> dict[str, EasyQuantResult]:
    """EasyQuant on many layers (weight quantizers per output channel).

    Only the rows the search reads (`jaxq.easyquant.ROWS_USED`) are stacked, and the float
    rows once when they are the same rows (float inputs)."""
    inputs = {
        n: l._replace(
            rows=l.rows[:ROWS_USED],
            target=None if l.target is l.rows else l.target[:ROWS_USED],
            weight=QParams(l.weight.scale, l.weight.offset, l.weight.scheme.with_axis(0)),
        )
        for n, l in layers.items()
    }
    return map_buckets(
        bind(_easy_quant_bucket, candidates=candidates, rounds=rounds), inputs, progress, EASY_QUANT_BUCKET_BYTES
    )


def _easy_quant_bucket(layer, candidates: int, rounds: int):
    return easy_quant_bucket(*layer, candidates=candidates, rounds=rounds)


def adaround_layers(
    weights: Mapping[str, jax.Array],
    layers: Mapping[str, LayerRows],
    params: AdaRoundParams,
    progress=None,
    start: Mapping[str, jax.Array] | None = None,
) -> dict[str, AdaRoundResult]:
    """AdaRound codes for many layers under their (fixed) weight and activation quantizers,
    from the float weights or, with `start`, from those codes.

    Each layer's rows are reduced to their moment one layer at a time, so only the small
    moments are stacked into buckets (memory: one layer's rows, not a bucket's)."""
    inputs = {
        n: (
            jnp.asarray(weights[n]),
            l.wg,
            l.weight,
            layer_moment(l.rows, l.act),
            None if start is None else jnp.asarray(start[n], jnp.int32),
        )
        for n, l in layers.items()
    }
    return map_buckets(bind(_adaround_bucket, params=params), inputs, progress)


_row_moments = jax.jit(row_moments)
MOMENT_CHUNK = 256  # rows moved to the device at a time when a layer's moment is summed


def layer_moment(rows, act: QParams | None) -> Moments | RowFactor:
    """`row_moments(rows, act)` of host rows `[m, g, d]`, summed `MOMENT_CHUNK` rows at a
    time (`moment_sum`; the last chunk zero-padded and masked, so one program per row
    shape) — a layer's rows are never copied whole. Rows wider than they are many keep
    their factor, which is as large as the rows anyway."""
    m, g, d = rows.shape
    if d > m or m <= MOMENT_CHUNK:
        return _row_moments(rows, act)
    total = None
    for start in range(0, m, MOMENT_CHUNK):
        chunk = np.asarray(rows[start : start + MOMENT_CHUNK], np.float32)
        k = chunk.shape[0]
        if k < MOMENT_CHUNK:
            chunk = np.concatenate([chunk, np.zeros((MOMENT_CHUNK - k, g, d), np.float32)])
        part = moment_sum(chunk, act, np.arange(MOMENT_CHUNK) < k)
        total = part if total is None else total + part
    return Moments(total / m)


def _adaround_bucket(t, params: AdaRoundParams):
    w, wg, weight, mom, start = t
    return adaround_bucket(w, tuple(wg.shape[1:]), weight, mom, params, start)


@cached_jit
def _bias_correction_bucket(t) -> jax.Array:
    mean, wg, qw = t
    w_hat = jax.vmap(dequantize)(qw.q, qw.qparams).reshape(wg.shape)
    return bias_shift_bucket(mean, wg, w_hat)


PACKED_MAX = 1 << 16  # weight values up to which bias correction packs a layer's channels


@cached_jit
def _bias_shift_rows(chunk) -> jax.Array:
    """`δ_c = Σ_d (w − (q − o)·s)_{c,d} · E[row]_{c,d}` for packed output rows (`map_rows`):
    `w, q, mean [1, rows, d]`, `scale, offset [1, rows]`."""
    w, q, mean, scale, offset = chunk
    w_hat = (q - offset[..., None]).astype(jnp.float32) * scale[..., None]
    d = w.astype(jnp.float32) - w_hat
    return jnp.einsum("lrd,lrd->lr", d, mean.astype(jnp.float32), precision="highest")


def _channel_rows(mean_row, wg, qw: QuantizedWeight) -> tuple | None:
    """One layer's bias-correction rows, one per output channel: `W`, `q` and the mean input
    row of the channel's group `[out, d]`, and `s`, `o` `[out]`. None where the weight's
    quantization axis is not its first (output) axis, or its parameters are elementwise
    (weight groups, `jaxq.groupwise.columns`)."""
    g, per, d = np.shape(wg)
    out = g * per
    qp = qw.qparams
    if (qp.scheme.axis not in (None, 0) and np.size(qp.scale) != 1) or np.size(qp.scale) not in (1, out):
        return None
    scale, offset = (np.broadcast_to(np.asarray(v).reshape(-1), (out,)) for v in (qp.scale, qp.offset))
    mean = np.repeat(np.asarray(mean_row).reshape(g, d), per, axis=0)
    return np.asarray(wg).reshape(out, d), np.asarray(qw.q).reshape(out, d), mean, scale, offset


def bias_corrections(
    mean_rows: Mapping[str, jax.Array],
    grouped_weights: Mapping[str, jax.Array],
    quantized: Mapping[str, QuantizedWeight],
) -> dict[str, jax.Array]:
    """Per layer `δ = (W − Ŵ)·E[row]` (`[out]`), `Ŵ = (q − o)·s` the simulated weight.

    Each output channel is its own dot product, so the channels of every small weight (at
    most `PACKED_MAX` values: most of a CNN's many shapes) go through one program per row
    width (`map_rows`, widths padded to a power of two: a dot product costs little per
    padded entry) instead of one per shape. Larger weights, and weights quantized along
    another axis, keep one program per shape, called once per layer on its arrays in place:
    stacking them would copy every large weight into fresh memory on each run, which costs
    more than the calls (and, where the host hands freed pages back, several times more)."""
    inputs = {n: (mean_rows[n], grouped_weights[n], quantized[n]) for n in mean_rows}
    rows, other = {}, {}
    for n, (mean, wg, qw) in inputs.items():
        r = _channel_rows(mean, wg, qw) if np.size(wg) <= PACKED_MAX else None
        if r is None:
            other[n] = inputs[n]
        else:
            rows[n] = r
    out = {n: v[0] for n, v in map_rows(_bias_shift_rows, rows, power_of_two).items()} if rows else {}
    out.update(map_buckets(_bias_correction_bucket, other, max_bytes=1) if other else {})
    return {n: out[n] for n in mean_rows}


class LayerState(NamedTuple):
    """What the layer-local steps (`jaxq.pipeline.layer_local`) transform, per layer: the
    quantized weight, the activation quantizer (None = float input) and its rows (`LayerRows`)."""

    weights: dict
    act: dict
    layers: dict


_quantize_jit = jax.jit(quantize)


def easy_quant_step(float_weights, state: LayerState, settings, progress=None) -> tuple[LayerState, dict]:
    """EasyQuant's scales (`jaxq.keep_acc.EasyQuant`) in place of the observers'; report
    `{layer: (cosine before, cosine after)}`."""
    weights, act, layers = dict(state.weights), dict(state.act), dict(state.layers)
    found = easy_quant_layers(layers, settings.candidates, progress=progress)
    for name, r in found.items():
        qp = QParams(r.weight.scale, r.weight.offset, weights[name].qparams.scheme)
        weights[name] = QuantizedWeight(qp, _quantize_jit(float_weights[name], qp))
        if act.get(name) is not None:
            act[name] = r.act
        layers[name] = layers[name]._replace(weight=qp, act=r.act if act.get(name) is not None else None)
    report = {n: (float(r.cosine_before), float(r.cosine_after)) for n, r in found.items()}
    return LayerState(weights, act, layers), report


def round_opt_step(float_weights, state: LayerState, settings, progress=None) -> tuple[LayerState, dict]:
    """SQuant codes under the current quantizers (data-free; no report)."""
    weights = squant_weights({n: float_weights[n] for n in state.weights}, state.weights, progress=progress)
    return state._replace(weights=weights), {}


def adaround_step(float_weights, state: LayerState, settings, progress=None) -> tuple[LayerState, dict]:
    """AdaRound codes (`jaxq.keep_acc.AdaRound`) where they lower the layer's output error
    on its rows (never worse than round to nearest); report `{layer: (error before, after)}`."""
    weights = dict(state.weights)
    start = {n: state.weights[n].q for n in state.layers} if settings.from_codes else None
    params = AdaRoundParams(steps=settings.steps)
    found = adaround_layers(float_weights, state.layers, params, progress=progress, start=start)
    report = {}
    for name, r in found.items():
        before, after = float(r.error_before), float(r.error_after)
        if after <= before:
            weights[name] = QuantizedWeight(weights[name].qparams, r.q)
        report[name] = (before, min(before, after))
    return state._replace(weights=weights), report


def _hessian(mom: Moments | RowFactor) -> jax.Array:
    if isinstance(mom, RowFactor):
        return jnp.einsum("gmd,gme->gde", mom.r, mom.r, precision=jax.lax.Precision.HIGHEST)
    return mom.h_hat


def gptq_layers(
    layers: Mapping[str, LayerRows], quantized: Mapping[str, QuantizedWeight], params: GptqParams, progress=None
) -> dict[str, tuple[np.ndarray, float, float]]:
    """GPTQ codes `[g, o, d]` of many layers under their (fixed) weight quantizers, with the
    output error `E‖(Ŵ − W)x̂‖²` of the current codes and of GPTQ's (`jaxq.gptq`); `x̂` the
    layer's input rows through its activation quantizer. Each group of a grouped layer is
    one problem; problems of a size bucket are solved in one program."""
    problems, schemes = {}, {}
    for name, l in layers.items():
        h = np.asarray(_hessian(layer_moment(l.rows, l.act)), np.float32)
        wg = np.asarray(l.wg, np.float32)
        g, o, _ = wg.shape
        # per channel [g, o, 1], or per column [g, o, d] (`jaxq.groupwise.columns`)
        scale = np.reshape(np.asarray(l.weight.scale, np.float32), (g, o, -1))
        offset = np.reshape(np.asarray(l.weight.offset, np.float32), (g, o, -1))
        start = np.reshape(np.asarray(quantized[name].q), wg.shape)
        for k in range(g):
            problems[(name, k)] = Problem(wg[k], h[k], scale[k], offset[k], start[k])
        schemes.setdefault((l.weight.scheme.qmin, l.weight.scheme.qmax), []).append(name)
    solved, finished = {}, set()

    def done(keys) -> None:
        names = {n for n, _ in keys} - finished
        complete = [n for n in names if all((n, k) in solved for k in range(layers[n].wg.shape[0]))]
        finished.update(complete)
        if progress is not None and complete:
            progress(len(complete))

    for (qmin, qmax), names in schemes.items():
        part = {key: p for key, p in problems.items() if key[0] in set(names)}
        solve = solve_problems(part, qmin, qmax, params)
        solved.update(solve)
        done(list(solve))
    out = {}
    for name, l in layers.items():
        g = l.wg.shape[0]
        parts = [solved[(name, k)] for k in range(g)]
        out[name] = (np.stack([c for c, _, _ in parts]), sum(b for _, b, _ in parts), sum(a for _, _, a in parts))
    return out


def gptq_step(float_weights, state: LayerState, settings, progress=None) -> tuple[LayerState, dict]:
    """GPTQ codes (`jaxq.keep_acc.Gptq`) where they lower the layer's output error on its
    rows (never worse than the codes it started from); report `{layer: (error before, after)}`."""
    weights = dict(state.weights)
    params = GptqParams(settings.block_size, settings.damp, settings.act_order)
    found = gptq_layers(state.layers, weights, params, progress=progress)
    report = {}
    for name, (codes, before, after) in found.items():
        before, after = float(before), float(after)
        if after <= before:
            weights[name] = QuantizedWeight(weights[name].qparams, jnp.reshape(codes, weights[name].q.shape))
        report[name] = (before, min(before, after))
    return state._replace(weights=weights), report


LAYER_STEPS = {"easy_quant": easy_quant_step, "round_opt": round_opt_step, "adaround": adaround_step, "gptq": gptq_step}
