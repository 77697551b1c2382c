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
candidates are one `vmap`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.groupwise import group_fake_quant, group_qparams
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
