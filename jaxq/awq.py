"""AWQ (Lin et al., MLSys 2024): activation-aware scales for the input channels of the
Linear layers that read one tensor.

Channels that carry large activations matter most; scaling weight column `j` up by
`s_j` before quantization (and the input channel down by `s_j`, folded into the op that
produces it) shrinks that column's relative rounding error. With `m_j = mean|x_j|` over
the calibration rows, AWQ searches

    s(α) = m^α / √(max m^α · min m^α),   α ∈ {0, 1/n, …, (n−1)/n}

and keeps the α whose quantized layer outputs are closest to the float ones,

    err(α) = mean ‖x (Q(W·diag s)·diag s⁻¹ − W)ᵀ‖²    over the sampled rows x,

with `Q` the group-wise round to nearest of `jaxq.groupwise`. `α = 0` (`s = 1`) is plain
round to nearest, so the chosen scales never lose to it on this measure. All `n`
candidates are one `vmap`. AWQ then clips each weight group's range (`search_clip`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.groupwise import check_group_size, group_fake_quant, group_qparams
from jaxq.numerics import fake_quant
from jaxq.qparams import QParams, qparams_from_range
from jaxq.scheme import QScheme


def candidate_scales(mean_abs: jax.Array, grid: int) -> jax.Array:
    """`s(α)` `[grid, d]` for `α = k/grid` (module docstring); channels never active get `s = 1`."""
    active = mean_abs[None, :] > 0
    m = jnp.where(active, mean_abs.astype(jnp.float32), 1.0)
    alphas = jnp.arange(grid, dtype=jnp.float32) / grid
    s = m ** alphas[:, None]
    hi = jnp.max(jnp.where(active, s, 0.0), axis=1, keepdims=True)
    lo = jnp.min(jnp.where(active, s, jnp.inf), axis=1, keepdims=True)
    return jnp.where(active, s / jnp.sqrt(hi * lo), 1.0)


def scaled_error(w: jax.Array, x: jax.Array, s: jax.Array, scheme: QScheme, group_size: int | None) -> jax.Array:
    """`err` of one candidate `s [d]` for the stacked weight `w [o, d]` and rows `x [n, d]`."""
    ws = w * s[None, :]
    w_hat = group_fake_quant(ws, group_qparams(ws, scheme, group_size)) / s[None, :]
    out = jnp.matmul(x, (w_hat - w).T, precision=jax.lax.Precision.HIGHEST)
    return jnp.mean(out * out)


@functools.partial(jax.jit, static_argnames=("scheme", "group_size", "grid"))
def search_scales(
    w: jax.Array, x: jax.Array, mean_abs: jax.Array, scheme: QScheme, group_size: int | None, grid: int = 20
):
    """`(s [d], err [grid])`: the best input-channel scales for `w [o, d]` (every layer
    reading the input, stacked along `o`) and each candidate's error."""
    cands = candidate_scales(mean_abs, grid)
    errs = jax.vmap(lambda s: scaled_error(w.astype(jnp.float32), x.astype(jnp.float32), s, scheme, group_size))(cands)
    return cands[jnp.argmin(errs)], errs


def _group_error(wg, xg, lo, hi, r, scheme: QScheme):
    qp = qparams_from_range(lo * r, hi * r, scheme.with_axis(None))
    w_hat = fake_quant(wg, QParams(qp.scale[..., None], qp.offset[..., None], qp.scheme))
    out = jnp.einsum("ngc,ogc->nog", xg, w_hat - wg, precision=jax.lax.Precision.HIGHEST)
    return jnp.mean(out * out, axis=0)


@functools.partial(jax.jit, static_argnames=("scheme", "group_size", "grid", "max_shrink"))
def search_clip(
    w: jax.Array, x: jax.Array, scheme: QScheme, group_size: int | None, grid: int = 20, max_shrink: float = 0.5
) -> QParams:
    """AWQ's weight clipping: per output row and group, the range `[r·min, r·max]` with
    `r ∈ {1, 1 − max_shrink/grid, …}` whose rounding moves that group's share of the
    output least, `mean_x (Σ_{c∈group} x_c·(ŵ_c − w_c))²` over the rows `x [n, d]`.
    Returns group parameters `[o, d/g]` (`jaxq.groupwise`); `r = 1` is plain min–max."""
    o, d = w.shape
    g = check_group_size(d, group_size)
    wg = jnp.reshape(w.astype(jnp.float32), (o, d // g, g))
    xg = jnp.reshape(x.astype(jnp.float32), (x.shape[0], d // g, g))
    lo, hi = jnp.minimum(wg.min(-1), 0.0), jnp.maximum(wg.max(-1), 0.0)
    ratios = 1.0 - max_shrink * jnp.arange(grid, dtype=jnp.float32) / grid
    errs = jax.lax.map(lambda r: _group_error(wg, xg, lo, hi, r, scheme), ratios)
    r = ratios[jnp.argmin(errs, axis=0)]
    qp = qparams_from_range(lo * r, hi * r, scheme.with_axis(None))
    return QParams(qp.scale, qp.offset, scheme)
