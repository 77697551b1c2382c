"""Histogram observer (`act_method=2`) with a global L2-optimal range search.

State: a histogram of `B` equal bins over the running range `[lo, hi]`. When a batch
widens the range, the old histogram is re-binned onto the new one by interpolating its
cumulative distribution at the new edges — mass is conserved exactly — and the batch is
binned onto the new range (`torch.histc` rule: `i = ⌊(x − lo)·B/(hi − lo)⌋`, clamped).

Range search. A candidate keeps source bins `s … e` (inclusive): the range
`[s, e + 1)` in bin units, carrying the `levels` grid points a quantizer really uses
(`Δ = (e − s + 1)/(levels − 1)`, both edges representable). Its error is the L2 error
of rounding every bin's mass (spread uniformly over the bin) to that grid, clipping
outside (`grid_error`, exact in closed form). torch.ao's `HistogramObserver` instead
scores `levels` bins whose *centres* are the grid — a grid no quantizer uses, which
charges zero (a ReLU spike) half a step of error and so over-rewards clipping — and
walks a greedy path that stops at the first increase. jaxq searches every pair `s ≤ e`:

1. Each candidate is scored in O(1) by a model of its error: uniform rounding noise
   `Δ²/12` per unit of mass inside, plus the exact squared distance of every clipped
   bin centre to its clip edge, `Σ_{i<s} c_i (s − u_i)²` with `u_i = i + ½` (and the
   mirror image above `e`). These sums come from nested cumulative sums of
   non-negative terms (`A[s+1] = A[s] + N[s] + c_s/2`,
   `Q[s+1] = Q[s] + 2A[s] + N[s] + c_s/4`, `N` the count prefix), so float32 suffers no
   cancellation.
2. The `top_k` starts with the best modelled candidates (each with its best end), the
   model's best start for each of `WIDTHS` widths, the flush-left/right candidates of
   those widths and the full range are scored exactly; the best is refined by exact-error
   coordinate descent on both edges. The model is
   exact for smooth histograms but not for spikes; step 2 is what makes the search
   exact where it matters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.observers import ROW, Observer, _note_bad, buffer_minmax, observer_factory, row_count, row_parts

DEFAULT_BINS = 2048
DEFAULT_SAMPLE_ROWS = 256  # 2^18 values binned per layer and batch
TOP_K = 64
SEED_BINS = 2048  # resolution of the modelled search: B² candidates, memory and time
WIDTHS = 48
ROW_BLOCK = 128  # starts whose modelled errors are evaluated together
REFINE_STEPS = 64


class HistogramState(NamedTuple):
    hist: jax.Array  # [bins] float32 counts over [lo, hi]
    lo: jax.Array
    hi: jax.Array
    count: jax.Array
    first_bad: jax.Array


def rebin(hist: jax.Array, lo, hi, new_lo, new_hi) -> jax.Array:
    """Move `hist` over `[lo, hi]` onto the same number of bins over `[new_lo, new_hi] ⊇ [lo, hi]`.

    `CDF_new(f_j) = CDF_old(f_j)`, linear inside each old bin, `hist_new = diff(CDF_new)`.
    Both grids are uniform, so the new edge `f_j` sits at `p_j = (f_j − lo)·B/(hi − lo)`
    old bins: `CDF_old(f_j) = cdf[i] + (p_j − i)·hist[i]`, `i = ⌊p_j⌋` (clamped) — a
    gather, where `jnp.interp` would binary-search every edge. A degenerate old range
    (`hi = lo`) puts all its mass in the bin that contains `lo`.
    """
    bins = hist.shape[0]
    k = jnp.arange(bins + 1, dtype=jnp.float32)
    new_edges = new_lo + (new_hi - new_lo) * k / bins
    width = jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny)
    p = jnp.clip((new_edges - lo) * (bins / width), 0.0, float(bins))
    i = jnp.minimum(jnp.floor(p), bins - 1).astype(jnp.int32)
    cdf = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(hist)])
    spread = jnp.diff(cdf[i] + (p - i.astype(jnp.float32)) * hist[i])
    point = jnp.zeros_like(hist).at[_bin_index(lo, new_lo, new_hi, bins)].set(jnp.sum(hist))
    return jnp.where(hi > lo, spread, point)


def _bin_index(x, lo, hi, bins: int):
    width = jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny)
    return jnp.clip(jnp.floor((x - lo) * (bins / width)), 0, bins - 1).astype(jnp.int32)


def batch_histogram(x: jax.Array, n_valid, lo, hi, bins: int, max_rows: int = 0, phase=0) -> jax.Array:
    """Counts of the first `n_valid` entries of the buffer `x` in `bins` bins over `[lo, hi]`.

    `max_rows > 0` bins a sample: with the buffer as `R` rows of `ROW` values and stride
    `k = ⌈R / max_rows⌉`, the rows `r ≡ phase (mod k)`, each count weighted `k` (an
    unbiased estimate of the full counts). Contiguous rows keep the sample cheap; varying
    `phase` between batches keeps it from aliasing with the layout.
    """
    total = row_count(x)
    stride = max(1, -(-total // max_rows)) if max_rows > 0 else 1
    counts = jnp.zeros((bins + 1,), jnp.int32)
    first = 0
    for rows in row_parts(x):  # the whole rows, then a padded partial row
        counts = counts + _sampled_counts(rows, first, n_valid, lo, hi, bins, stride, phase)
        first += rows.shape[0]
    return counts[:bins].astype(jnp.float32) * stride


def _sampled_counts(rows: jax.Array, first: int, n_valid, lo, hi, bins: int, stride: int, phase) -> jax.Array:
    """`bins + 1` counts (the last: padding and unsampled rows) of the rows `r ≡ phase (mod
    stride)` of a block whose first row is row `first` of the buffer."""
    count = rows.shape[0]
    # The sampled rows are gathered by index: padding `rows` to a multiple of the stride
    # and reshaping would copy the whole buffer.
    local = (phase - first) % stride + stride * jnp.arange(-(-count // stride), dtype=jnp.int32)
    sample = jnp.take(rows, local, axis=0, mode="clip") if stride > 1 else rows
    index = (first + local)[:, None] * ROW + jnp.arange(ROW, dtype=jnp.int32)[None, :]
    valid = (index < n_valid) & (local < count)[:, None]
    # Padding goes to an extra bin that is dropped; an int32 scatter of ones is ~1.5×
    # faster on CPU than a float scatter of mask weights.
    idx = jnp.where(valid, _bin_index(sample, lo, hi, bins), bins)
    return jnp.zeros((bins + 1,), jnp.int32).at[idx.reshape(-1)].add(1, mode="promise_in_bounds")


# --- error of a candidate range -----------------------------------------------------------


def grid_error(hist: jax.Array, start, end, levels: int) -> jax.Array:
    """L2 error (bin units) of quantizing `hist` with the grid a quantizer really uses.

    The candidate range `[s, e + 1)` carries `levels` grid points `s + k·Δ`,
    `Δ = (e − s + 1)/(levels − 1)`, both edges included; values round to the nearest
    point and clip to the edges. Each bin's mass is spread uniformly over the bin. With
    `t` measured from the range start, the rounding error integrates in closed form:

        H(t) = ∫_{−Δ/2}^{t} saw(u)² du = m·Δ³/12 + ((r − Δ/2)³ + (Δ/2)³)/3,
        t = (m − ½)·Δ + r,  0 ≤ r < Δ.
    """
    bins = hist.shape[0]
    length = (end - start + 1).astype(jnp.float32)
    step = length / (levels - 1)
    a = jnp.arange(bins, dtype=jnp.float32) - start.astype(jnp.float32)
    b = a + 1.0

    def H(t):
        m = jnp.floor((t + step / 2) / step)
        r = t + step / 2 - m * step
        return m * step**3 / 12.0 + ((r - step / 2) ** 3 + (step / 2) ** 3) / 3.0

    below = (jnp.minimum(b, 0.0) ** 3 - jnp.minimum(a, 0.0) ** 3) / 3.0
    above = (jnp.maximum(b - length, 0.0) ** 3 - jnp.maximum(a - length, 0.0) ** 3) / 3.0
    lo_in, hi_in = jnp.clip(a, 0.0, length), jnp.clip(b, 0.0, length)
    inside = H(hi_in) - H(lo_in)
    # A dot, not `sum(hist · terms)`: vmapped over candidates it is a matrix-vector
    # product, ~10× faster on CPU than XLA's fused multiply-reduce.
    return jnp.dot(below + above + inside, hist, precision=jax.lax.Precision.HIGHEST)


def _side_moments(c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`N[s], A[s], Q[s]` for s = 0…B (see module docstring), by nested cumsums."""
    z = jnp.zeros((1,), jnp.float32)
    n = jnp.concatenate([z, jnp.cumsum(c)])
    a = jnp.concatenate([z, jnp.cumsum(n[:-1] + 0.5 * c)])
    q = jnp.concatenate([z, jnp.cumsum(2.0 * a[:-1] + n[:-1] + 0.25 * c)])
    return n, a, q


def modelled_error(hist: jax.Array, levels: int):
    """`f(s, e)`: the modelled L2 error (bin units) of candidates `(s, e)` (broadcasting
    index arrays), `inf` where `e < s`. Each value is O(1) from the side moments, so a
    caller evaluates only the candidates it needs; XLA fuses a full `[B, B]` evaluation
    into its consumer without writing the matrix."""
    bins = hist.shape[0]
    n_lo, _, q_lo = _side_moments(hist)
    _, _, q_hi_r = _side_moments(hist[::-1])

    def f(s, e):
        step = (e - s + 1).astype(jnp.float32) / (levels - 1)
        inside = (n_lo[e + 1] - n_lo[s]) * step**2 / 12.0
        high = q_hi_r[bins - 1 - e]  # bins above e, counted from the top
        return jnp.where(e >= s, inside + q_lo[s] + high, jnp.inf)

    return f


def _exact(hist, starts, ends, levels, zero):
    errs = jax.vmap(lambda s, e: grid_error(hist, s, e, levels))(starts, ends)
    return jnp.where(_contains_zero(starts, ends, zero), errs, jnp.inf)


def _contains_zero(s, e, zero):
    """Whether the candidate `[s, e + 1)` contains the point `zero` (bin units; `zero`
    outside `[0, B]` forces the flush edge, since the quantizer widens to 0 anyway)."""
    smax, emin = zero
    return (s <= smax) & (e >= emin)


def zero_limits(lo, hi, bins: int):
    """`(s_max, e_min)`: candidates must start at or before, end at or after, the bin of 0."""
    p0 = -lo / jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny) * bins
    smax = jnp.clip(jnp.floor(p0), 0, bins - 1).astype(jnp.int32)
    emin = jnp.clip(jnp.ceil(p0) - 1, 0, bins - 1).astype(jnp.int32)
    return smax, emin


def first_index_of_min(a: jax.Array, row_min: jax.Array) -> jax.Array:
    """`argmin(a, axis=1)` given the row minima: `min {j : a[i, j] = row_min[i]}`.

    Two plain reductions instead of XLA's (value, index) reduce, which does not vectorise
    on CPU and costs more than the whole `[B, B]` model."""
    j = jnp.arange(a.shape[1], dtype=jnp.int32)
    return jnp.min(jnp.where(a == row_min[:, None], j[None, :], a.shape[1]), axis=1)


def _row_minima(model, bins: int, smax) -> jax.Array:
    """`min_e model(s, e)` for every start `s`, evaluated in blocks of `ROW_BLOCK` starts up
    to `smax` only: later starts cannot contain zero (their minimum is `inf`). After a
    ReLU `smax = 0`, so one block replaces the whole `[B, B]` model."""
    block = min(ROW_BLOCK, bins)
    padded = -(-bins // block) * block
    e = jnp.arange(bins, dtype=jnp.int32)

    def body(i, acc):
        s = i * block + jnp.arange(block, dtype=jnp.int32)
        rows = jnp.where(s[:, None] < bins, model(jnp.minimum(s, bins - 1)[:, None], e[None, :]), jnp.inf)
        return jax.lax.dynamic_update_slice(acc, jnp.min(rows, axis=1), (i * block,))

    row_min = jax.lax.fori_loop(0, smax // block + 1, body, jnp.full((padded,), jnp.inf, jnp.float32))
    return row_min[:bins]


def _seed_candidates(model, bins: int, levels: int, top_k: int, zero) -> tuple[jax.Array, jax.Array]:
    """Starting points: the `top_k` starts whose best end the model rates best (each with
    that end), and for widths spaced geometrically from `levels` to `B` the model's best
    start plus both flush positions. `model(s, e)` is `modelled_error` restricted to
    candidates that contain zero."""
    # Best end per start, then top-k over B starts: a top-k over all B² pairs costs 3×
    # the model itself on CPU, and its winners crowd around one optimum anyway. Only the
    # minimum of each row is taken over all B² pairs (fused, no matrix is written); the
    # best ends are found again on the top-k rows alone.
    s = jnp.arange(bins, dtype=jnp.int32)
    row_min = _row_minima(model, bins, zero[0])
    _, top_starts = jax.lax.top_k(-row_min, top_k)
    top_starts = top_starts.astype(jnp.int32)
    top_rows = model(top_starts[:, None], s[None, :])
    starts, ends = [top_starts], [first_index_of_min(top_rows, jnp.min(top_rows, axis=1))]
    distinct = np.unique(np.geomspace(min(levels, bins), bins, WIDTHS).astype(np.int32))
    widths = jnp.asarray(np.pad(distinct, (0, WIDTHS - distinct.size), constant_values=bins))
    e = s[None, :] + widths[:, None] - 1
    by_start = jnp.where(e < bins, model(s[None, :], jnp.minimum(e, bins - 1)), jnp.inf)  # [WIDTHS, B]
    for st in (first_index_of_min(by_start, jnp.min(by_start, axis=1)), jnp.zeros_like(widths), bins - widths):
        starts.append(st)
        ends.append(st + widths - 1)
    starts.append(jnp.array([0]))
    ends.append(jnp.array([bins - 1]))
    return jnp.concatenate(starts).astype(jnp.int32), jnp.concatenate(ends).astype(jnp.int32)


def _refine(hist, start, end, err, levels: int, zero):
    """Exact-error coordinate descent: move either edge by ±1, ±2, … ±64 bins while it helps."""
    bins = hist.shape[0]
    steps = jnp.array([1, 2, 4, 8, 16, 32, 64, -1, -2, -4, -8, -16, -32, -64], jnp.int32)

    def neighbours(s, e):
        ns = jnp.concatenate([jnp.clip(s + steps, 0, e), jnp.full_like(steps, s)])
        ne = jnp.concatenate([jnp.full_like(steps, e), jnp.clip(e + steps, s, bins - 1)])
        return ns, ne

    def body(carry):
        s, e, err, _, it = carry
        ns, ne = neighbours(s, e)
        errs = _exact(hist, ns, ne, levels, zero)
        i = jnp.argmin(errs)
        better = errs[i] < err
        return (jnp.where(better, ns[i], s), jnp.where(better, ne[i], e), jnp.minimum(errs[i], err), better, it + 1)

    cond = lambda c: c[3] & (c[4] < REFINE_STEPS)  # noqa: E731
    s, e, err, _, _ = jax.lax.while_loop(cond, body, (start, end, err, jnp.bool_(True), jnp.int32(0)))
    return s, e, err


def l2_optimal_bins(
    hist: jax.Array, levels: int, zero=None, top_k: int = TOP_K
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(start, end, error)` minimising the exact `grid_error` (bin units).

    Global: every pair `s ≤ e` of the histogram merged to at most `SEED_BINS` bins is
    scored by the O(1) model; the model's best candidates (globally and per width) are
    scored exactly at full resolution, and the best of them is refined by exact-error
    coordinate descent on both edges. `zero = zero_limits(lo, hi, B)` restricts the
    search to ranges that contain 0, as every quantizer's range does (docs/design.md §3);
    `None` searches every range.
    """
    bins = hist.shape[0]
    if zero is None:
        zero = (jnp.int32(bins - 1), jnp.int32(0))
    merge = -(-bins // SEED_BINS)
    coarse = jnp.pad(hist, (0, (-bins) % merge)).reshape(-1, merge).sum(axis=1)
    cbins = coarse.shape[0]
    czero = (zero[0] // merge, zero[1] // merge)  # coarse candidates with 0 inside keep it at full resolution
    error = modelled_error(coarse, levels)

    def model(s, e):
        return jnp.where(_contains_zero(s, e, czero), error(s, e), jnp.inf)

    starts, ends = _seed_candidates(model, cbins, levels, min(top_k, cbins), czero)
    starts, ends = starts * merge, jnp.minimum(ends * merge + merge - 1, bins - 1)
    exact = _exact(hist, starts, ends, levels, zero)
    best = jnp.argmin(exact)
    return _refine(hist, starts[best], ends[best], exact[best], levels, zero)


def bins_to_range(lo, hi, start, end, bins: int) -> tuple[jax.Array, jax.Array]:
    w = (hi - lo) / bins
    return lo + w * start, lo + w * (end + 1)


# --- the observer -------------------------------------------------------------------------


@observer_factory
def histogram_observer(bins: int = DEFAULT_BINS, levels: int = 256, max_rows: int = DEFAULT_SAMPLE_ROWS) -> Observer:
    """`act_method=2`: streaming histogram, then the L2-optimal range for `levels` levels.

    Each update takes the exact min/max of the whole batch (the range never misses a
    value) but bins at most `max_rows·ROW` of its values (`batch_histogram`; 0: all).
    """

    def init():
        return HistogramState(
            jnp.zeros((bins,), jnp.float32), jnp.float32(jnp.inf), jnp.float32(-jnp.inf), jnp.int32(0), jnp.int32(-1)
        )

    def update(state, x, n_valid):
        blo, bhi = buffer_minmax(x)
        new_lo, new_hi = jnp.minimum(state.lo, blo), jnp.maximum(state.hi, bhi)
        # re-bin only a histogram that has mass and whose range grew (the first batch keeps init's zeros)
        grown = (state.count > 0) & ((new_lo < state.lo) | (new_hi > state.hi))
        old = jax.lax.cond(grown, lambda: rebin(state.hist, state.lo, state.hi, new_lo, new_hi), lambda: state.hist)
        hist = old + batch_histogram(x, n_valid, new_lo, new_hi, bins, max_rows, state.count)
        return HistogramState(hist, new_lo, new_hi, state.count + 1, _note_bad(state.first_bad, state.count, blo, bhi))

    def finalize(state):
        start, end, _ = l2_optimal_bins(state.hist, levels, zero_limits(state.lo, state.hi, bins))
        return bins_to_range(state.lo, state.hi, start, end, bins), state.first_bad

    return Observer(init, update, finalize)
