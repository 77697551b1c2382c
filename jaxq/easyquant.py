"""EasyQuant (Wu et al. 2020, arXiv 2006.16669): scales that maximise output cosine.

For one layer with float output `Y = W·X + b` on the float model's input rows `X`
(`jaxq.rows`) and quantized output `Ŷ = Ŵ·fq(X_q) + b` on the quantized model's input
rows `X_q` at the same positions (`X_q = X` to optimise against float inputs), alternate
`rounds` times:

    activation:  S_a ← argmax_{α ∈ grid} cos(Y, Ŷ(α·S_a))                 (whole layer)
    weights:     S_c ← argmax_{β ∈ grid} cos(Y_c, Ŷ_c(β·S_c))   per output channel c

with `grid = linspace(0.5, 2, candidates)` and the zero points kept. The current scale is
always a candidate and a new one is taken only when it is strictly better; since channel
cosines that each rise can still lower the layer's, the found scales are kept only where the
layer cosine on the calibration rows does not decrease. The search fits `ROWS` rows and a layer keeps the
found scales only if they also raise its cosine on the next `ROWS` (held out; measured
in `benchmarks/README.md`). The candidate axis is a `vmap`, evaluated in chunks (`lax.map`) to bound
memory; the layer cosines of wide layers are summed a few hundred rows at a time (`row_step`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq.numerics import fake_quant
from jaxq.qparams import QParams
from jaxq.rows import rows_forward

ALPHA, BETA = 0.5, 2.0
CHUNK = 8
# Rows the search uses (the first of the sampled ones): the cost is candidates × rows ×
# weights, and a cosine over a few hundred rows of `out` channels is already a stable score.
ROWS = 512
ROWS_USED = 2 * ROWS  # fitted, then held out


class EasyQuantResult(NamedTuple):
    act: QParams | None
    weight: QParams
    cosine_before: jax.Array
    cosine_after: jax.Array


def _cosine(a: jax.Array, b: jax.Array, axis=None) -> jax.Array:
    num = jnp.sum(a * b, axis=axis)
    den = jnp.sqrt(jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis))
    return num / jnp.maximum(den, 1e-30)


def _scaled(qp: QParams, factor) -> QParams:
    return QParams(qp.scale * factor, qp.offset, qp.scheme)


def _candidates(n: int) -> jax.Array:
    return jnp.linspace(ALPHA, BETA, n, dtype=jnp.float32)


# floats of simulated rows the activation search holds at once, over all layers of a bucket
ACT_SEARCH_FLOATS = 1 << 24
# floats of a layer's simulated rows that a layer cosine holds at once; layers within it
# sum all their rows in one step (as written), larger ones in steps
ROW_STEP_FLOATS = 1 << 22


def act_row_chunk(layers: int, rows: int, row_floats: int, candidates: int) -> int:
    """Rows per step of `search_act_scale` so that every candidate's simulated rows and
    outputs (`row_floats`: `g·d + out` per row) of every layer in a bucket stay within
    `ACT_SEARCH_FLOATS` floats."""
    return int(max(1, min(rows, ACT_SEARCH_FLOATS // max(1, layers * (candidates + 1) * row_floats))))


def row_step(rows: int, row_floats: int) -> int | None:
    """Rows per step of a layer's cosines (`layer_cosine`): None (all at once) when the
    layer's simulated rows fit `ROW_STEP_FLOATS`, else a power of two that keeps one step
    within it (it divides the usual row counts)."""
    if rows * row_floats <= ROW_STEP_FLOATS:
        return None
    fit = max(1, ROW_STEP_FLOATS // row_floats)
    return 1 << (fit.bit_length() - 1)


def _sum_over_rows(fn, init, chunk: int | None, m: int, *arrays):
    """`Σ fn(keep, *parts)` over `m` rows, `chunk` at a time: `arrays` are `(array, first
    row)` pairs, each read in place by `dynamic_slice` (no copy of the rows); the last step
    is shifted back to end at row `m` and `keep` masks the rows it repeats. One step
    (`chunk` None or ≥ `m`): `fn(None, *parts)`, the sums exactly as written."""
    if chunk is None or chunk >= m:  # one step: the plain sums (`keep` None: every row counts)
        return fn(None, *(jax.lax.slice_in_dim(x, first, first + m) for x, first in arrays))
    steps = -(-m // chunk)

    def body(i, carry):
        start = jnp.minimum(i * chunk, m - chunk)
        keep = (start + jnp.arange(chunk) >= i * chunk).astype(jnp.float32)
        parts = [jax.lax.dynamic_slice_in_dim(x, first + start, chunk) for x, first in arrays]
        return jax.tree_util.tree_map(jnp.add, carry, fn(keep, *parts))

    return jax.lax.fori_loop(0, steps, body, init)


def _simulated(x, act: QParams | None):
    return x if act is None else fake_quant(x, act)


def search_act_scale(rows, y, w_hat_g, b, act: QParams, candidates: int, row_chunk: int | None = None) -> QParams:
    """Best per-tensor activation scale factor for the whole-layer cosine.

    Every candidate (and the current scale) is scored in one pass over the rows,
    `row_chunk` rows at a time: the cosine's sums `Σ y·ŷ` and `Σ ŷ²` accumulate per
    candidate, so no candidate's `fq(rows)` is ever held whole."""
    m = rows.shape[0]
    chunk = m if row_chunk is None else min(row_chunk, m)
    steps = -(-m // chunk)
    pad = steps * chunk - m
    mask = jnp.pad(jnp.ones((m,), jnp.float32), (0, pad)).reshape(steps, chunk)
    xs = jnp.pad(rows, ((0, pad),) + ((0, 0),) * (rows.ndim - 1)).reshape(steps, chunk, *rows.shape[1:])
    ys = jnp.pad(y, ((0, pad), (0, 0))).reshape(steps, chunk, -1)
    factors = jnp.concatenate([jnp.ones((1,), jnp.float32), _candidates(candidates)])

    def sums(carry, part):
        x, yc, keep = part

        def one(factor):
            y_hat = rows_forward(w_hat_g, b, fake_quant(x, _scaled(act, factor))) * keep[:, None]
            return jnp.stack([jnp.sum(yc * y_hat), jnp.sum(y_hat * y_hat)])

        return carry + jax.vmap(one)(factors), None

    totals, _ = jax.lax.scan(sums, jnp.zeros((factors.shape[0], 2), jnp.float32), (xs, ys, mask))
    scores = totals[:, 0] / jnp.maximum(jnp.sqrt(totals[:, 1] * jnp.sum(y * y)), 1e-30)
    current, scores = scores[0], scores[1:]
    best = jnp.argmax(scores)
    factor = jnp.where(scores[best] > current, factors[1:][best], 1.0)
    return _scaled(act, factor)


def _channel_cosine_from_moments(rows_hat, y, b):
    """`score(ŵ) -> cos(Y_c, Ŷ_c)` per channel from moments of the rows, `O(out·d²)` per call.

    With `Ŷ_c = ŵ_c·x̂ + b_c` over `m` rows:
        Σ Y_c Ŷ_c = ŵ_c·Σ x̂ Y_c + b_c Σ Y_c
        Σ Ŷ_c²    = ŵ_c Ĥ ŵ_cᵀ + 2 b_c ŵ_c·Σ x̂ + m b_c²,    Ĥ = Σ x̂x̂ᵀ (per group)
    """
    m, g, d = rows_hat.shape
    hp = jax.lax.Precision.HIGHEST
    yg = jnp.reshape(y, (m, g, -1))
    bg = jnp.zeros(yg.shape[1:]) if b is None else jnp.reshape(b, yg.shape[1:])
    s_xy = jnp.einsum("mgd,mgo->god", rows_hat, yg, precision=hp)
    s_x = jnp.sum(rows_hat, axis=0)
    s_y = jnp.sum(yg, axis=0)
    y2 = jnp.sum(yg * yg, axis=0)
    h = jnp.einsum("mgd,mge->gde", rows_hat, rows_hat, precision=hp)

    def score(w_hat):  # [g, o, d] -> [out]
        num = jnp.sum(w_hat * s_xy, axis=-1) + bg * s_y
        quad = jnp.sum(jnp.einsum("god,gde->goe", w_hat, h, precision=hp) * w_hat, axis=-1)
        den = jnp.sqrt(y2 * (quad + 2.0 * bg * jnp.einsum("god,gd->go", w_hat, s_x, precision=hp) + m * bg * bg))
        return jnp.reshape(num / jnp.maximum(den, 1e-30), (-1,))

    return score


def search_weight_scales(rows_hat, y, wg, b, weight: QParams, candidates: int) -> QParams:
    """Best scale factor per output channel for the per-channel output cosine.

    When a row is longer than there are rows (`d > m`) the output is recomputed per
    candidate; otherwise the cosine comes from the rows' moments (`O(out·d²)` per candidate).
    (The moments are summed in one pass: summed in steps, their rounding moved near-tied
    channels to other scales, and the pass is not where a layer's memory peaks.)
    """
    g, o, d = wg.shape
    flat = jnp.reshape(wg, (g * o, d))
    if d <= rows_hat.shape[0]:
        channel_cosine = _channel_cosine_from_moments(rows_hat, y, b)
    else:
        channel_cosine = lambda w_hat: _cosine(y, rows_forward(w_hat, b, rows_hat), axis=0)  # noqa: E731

    def score(factor):
        return channel_cosine(fake_quant(flat, _scaled(weight, factor)).reshape(g, o, d))  # [out]

    grid = _candidates(candidates)
    scores = jax.lax.map(score, grid, batch_size=CHUNK)  # [candidates, out]
    current = score(jnp.float32(1.0))
    best = jnp.argmax(scores, axis=0)
    best_score = jnp.take_along_axis(scores, best[None], axis=0)[0]
    factor = jnp.where(best_score > current, grid[best], 1.0)
    return _scaled(weight, factor)


def layer_cosine(
    rows, y, wg, b, act: QParams | None, weight: QParams, chunk: int | None = None, first: int = 0
) -> jax.Array:
    """Whole-layer `cos(Y, Ŷ)` on `rows[first : first + len(y)]`, `chunk` rows at a time
    (`Σ y·ŷ` and `Σ ŷ²` summed; the rows are read in place)."""
    g, o, d = wg.shape
    w_hat = fake_quant(jnp.reshape(wg, (g * o, d)), weight).reshape(g, o, d)

    def sums(keep, x, yc):
        y_hat = rows_forward(w_hat, b, _simulated(x, act))
        y_hat = y_hat if keep is None else y_hat * keep[:, None]
        return jnp.stack([jnp.sum(yc * y_hat), jnp.sum(y_hat * y_hat)])

    totals = _sum_over_rows(sums, jnp.zeros((2,), jnp.float32), chunk, y.shape[0], (rows, first), (y, 0))
    return totals[0] / jnp.maximum(jnp.sqrt(totals[1] * jnp.sum(y * y)), 1e-30)


def easy_quant(
    rows,
    target,
    wg,
    b,
    act: QParams | None,
    weight: QParams,
    candidates: int,
    rounds: int = 2,
    row_chunk: int | None = None,
    step: int | None = None,
) -> EasyQuantResult:
    """EasyQuant on one layer: quantized-model rows and float rows `[m, g, d]`, weight
    `[g, out/g, d]`, bias `[out]` or None.

    `weight` is per output channel (axis 0 of `[out, d]`); `act` is per tensor, or None
    for weight-only quantization (then only the weight scales are searched). The search
    fits the first `ROWS` rows; when there are more, the next `ROWS` are held out and the
    found scales are kept only if they raise the layer cosine there too (else the layer
    keeps its scales: a better fit that does not generalise is noise). `target=None`: the
    float rows are `rows` (optimising against float inputs). `row_chunk`: rows per step of
    the activation search (`search_act_scale`), `step`: of the layer cosines (None: all at
    once; `row_step`).
    """
    target = rows if target is None else target
    # the fitted rows are `rows[:ROWS]`, sliced where each search reads them: one shared
    # slice is materialised whole (temporaries 1.5 → 2.1× the rows of a wide bucket)
    y = rows_forward(wg, b, target[:ROWS])
    g, o, d = wg.shape
    act0, weight0 = act, weight
    before = layer_cosine(rows, y, wg, b, act, weight, step)

    def one_round(_, quantizers):
        act, weight = quantizers
        if act is not None:
            w_hat = fake_quant(jnp.reshape(wg, (g * o, d)), weight).reshape(g, o, d)
            act = search_act_scale(rows[:ROWS], y, w_hat, b, act, candidates, row_chunk)
        return act, search_weight_scales(_simulated(rows[:ROWS], act), y, wg, b, weight, candidates)

    # a loop, not unrolled rounds: one copy of the search to compile per layer shape
    act, weight = jax.lax.fori_loop(0, rounds, one_round, (act, weight))
    # channel cosines that each rise can still lower the layer's: keep only a layer-wide gain
    after = layer_cosine(rows, y, wg, b, act, weight, step)
    keep = after >= before
    if rows.shape[0] > ROWS:
        y_held = rows_forward(wg, b, target[ROWS : 2 * ROWS])
        new = layer_cosine(rows, y_held, wg, b, act, weight, step, first=ROWS)
        keep &= new > layer_cosine(rows, y_held, wg, b, act0, weight0, step, first=ROWS)
    act, weight = jax.tree_util.tree_map(lambda new, old: jnp.where(keep, new, old), (act, weight), (act0, weight0))
    return EasyQuantResult(act, weight, before, jnp.where(keep, after, before))


@functools.partial(jax.jit, static_argnames=("candidates", "rounds"))
def easy_quant_bucket(rows, target, wg, b, act, weight, candidates: int, rounds: int = 2) -> EasyQuantResult:
    """`easy_quant` over a stacked bucket of equal-shaped layers (the activation search's
    row chunk bounded over the whole bucket, `act_row_chunk`)."""
    layers, m, g, d = rows.shape
    row_floats = g * d + g * wg.shape[2]
    chunk = act_row_chunk(layers, min(m, ROWS), row_floats, candidates)
    step = row_step(min(m, ROWS), row_floats)
    return jax.vmap(lambda r, t, w, bb, a, q: easy_quant(r, t, w, bb, a, q, candidates, rounds, chunk, step))(
        rows, target, wg, b, act, weight
    )
