"""Per-channel weight ranges: the channel's extremes, or its range shrunk to the least rounding error.

    "minmax":  [lo_c, hi_c] = [min_k W_ck, max_k W_ck]                    (msModelSlim)
    "mse":     r_c·[lo_c, hi_c],  r_c = argmin_{r ∈ R} Σ_k (W_ck − ŵ_ck(r))²
               R = {1, 1 − (1 − MIN_RATIO)/(GRID − 1), …, MIN_RATIO}

`ŵ(r)` is the fake quantization (`jaxq.numerics.fake_quant`) under the scale and offset of
`r·[lo, hi]`. Clipping a few outlying weights buys a finer step for all the others; at
4 bits that step matters more than the clipped tails. BRECQ and QDrop start from this
search with the exponent 2.4 instead of 2; the square is a product where the power costs a
logarithm and an exponential per weight (`benchmarks/README.md` compares the two). A zero
weight (the padding of `map_rows`) costs nothing under any `r`: zero is on every grid of
`jaxq.qparams.qparams_from_range`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.numerics import fake_quant
from jaxq.observers import channel_minmax
from jaxq.qparams import qparams_from_range
from jaxq.scheme import QScheme

WEIGHT_RANGES = ("minmax", "mse")
MSE_RANGE_BITS = 4  # `QuantConfig(w_range=None)` searches weights of at most this many bits
GRID = 80
MIN_RATIO = 0.2


def resolved_range(w_range: str | None, bits: int) -> str:
    """`w_range` for weights of `bits` bits: as given, or (None) `"mse"` up to
    `MSE_RANGE_BITS` bits and `"minmax"` wider (`QuantConfig.w_range`'s default)."""
    if w_range is not None:
        if w_range not in WEIGHT_RANGES:
            raise ValueError(f"weight range {w_range!r} is not one of {WEIGHT_RANGES}")
        return w_range
    return "mse" if bits <= MSE_RANGE_BITS else "minmax"


def channel_ratios(flat: jax.Array, lo: jax.Array, hi: jax.Array, scheme: QScheme) -> jax.Array:
    """`r_c` of the module doc for the rows of `flat: [C, K]` with extremes `lo, hi: [C]`."""
    ratios = jnp.linspace(1.0, MIN_RATIO, GRID, dtype=jnp.float32)
    per_row = scheme.with_axis(0)

    def error(r):
        qp = qparams_from_range(lo * r, hi * r, per_row)
        d = fake_quant(flat, qp) - flat
        return jnp.sum(d * d, axis=1)

    def step(best, r):
        err = error(r)
        better = err < best[0]  # ties keep the wider range (r = 1 first)
        return (jnp.where(better, err, best[0]), jnp.where(better, r, best[1])), None

    start = (jnp.full(lo.shape, jnp.inf, jnp.float32), jnp.ones(lo.shape, jnp.float32))
    (_, r), _ = jax.lax.scan(step, start, ratios)
    return r


def channel_range(flat: jax.Array, scheme: QScheme, method: str = "minmax") -> tuple[jax.Array, jax.Array]:
    """Per-row `(lo, hi)` of `flat: [C, K]` by `method` (one of `WEIGHT_RANGES`)."""
    if method not in WEIGHT_RANGES:
        raise ValueError(f"weight range {method!r} is not one of {WEIGHT_RANGES}")
    flat = jnp.asarray(flat, jnp.float32)
    lo, hi = channel_minmax(flat, axis=0)
    if method == "minmax":
        return lo, hi
    r = channel_ratios(flat, lo, hi, scheme)
    return lo * r, hi * r
