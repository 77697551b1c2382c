"""SQuant data-free rounding (Guo et al., ICLR 2022; msModelSlim `keep_acc['round_opt']`).

With `x = clamp(W · (1/s) + o, qmin, qmax)` the real-valued code and `q = round(x)` the
round-to-nearest one, the rounding error `δ = q − x` is flipped in two passes so that the
summed error of every group stays within ±0.5:

    SQuant-K  groups = kernels      (one output channel × one input channel, kh·kw values)
    SQuant-C  groups = out channels (every value of the channel)

    per group:  n = round(Σ δ);  lower by one the n values with the largest δ (n > 0),
                or raise by one the |n| values with the smallest δ (n < 0)

Flipping the values closest to the other rounding direction changes the weight least.
Codes are clamped to the grid at the end; the weight is `Ŵ = (q − o)·s`. Linear weights
have one value per kernel, so only SQuant-C acts on them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.numerics import _broadcastable, quantize
from jaxq.qparams import QParams


def _rank(key: jax.Array) -> jax.Array:
    """Position of each value in its row sorted ascending."""
    return jnp.argsort(jnp.argsort(key, axis=1), axis=1)


def flip_groups(q: jax.Array, x: jax.Array, qmin: int, qmax: int) -> jax.Array:
    """One SQuant pass over the rows of `[groups, n]` codes `q` and real codes `x`.

    Codes already at the grid edge are the last to be pushed over it.
    """
    delta = q - x
    n_flip = jnp.round(jnp.sum(delta, axis=1, keepdims=True))
    lower_rank = _rank(-jnp.where(q > qmin, delta, -jnp.inf))  # largest δ first
    raise_rank = _rank(jnp.where(q < qmax, delta, jnp.inf))  # smallest δ first
    q = jnp.where(lower_rank < n_flip, q - 1, q)
    return jnp.where(raise_rank < -n_flip, q + 1, q)


def real_codes(w: jax.Array, qp: QParams) -> jax.Array:
    """`x = clamp(W · (1/s) + o, qmin, qmax)` in float (per output channel, axis 0)."""
    inv = _broadcastable(jnp.float32(1.0) / qp.scale, qp, w.ndim)
    off = _broadcastable(qp.offset.astype(jnp.float32), qp, w.ndim)
    return jnp.clip(w * inv + off, qp.scheme.qmin, qp.scheme.qmax)


def squant_round(w: jax.Array, qp: QParams) -> jax.Array:
    """SQuant codes (int32) of weight `w` `[out, in, *kernel]` with per-channel `qp`."""
    w = jnp.asarray(w, jnp.float32)
    x = real_codes(w, qp)
    q = quantize(w, qp).astype(jnp.float32)  # round-to-nearest, torch-exact
    out = w.shape[0]
    kernel = int(jnp.size(w) // (out * w.shape[1])) if w.ndim > 2 else 1
    lo, hi = qp.scheme.qmin, qp.scheme.qmax
    if kernel > 1:
        q = flip_groups(q.reshape(-1, kernel), x.reshape(-1, kernel), lo, hi).reshape(w.shape)
    q = flip_groups(q.reshape(out, -1), x.reshape(out, -1), lo, hi).reshape(w.shape)
    return jnp.clip(q, qp.scheme.qmin, qp.scheme.qmax).astype(jnp.int32)


@functools.partial(jax.jit)
def squant_round_bucket(ws: jax.Array, qps: QParams) -> jax.Array:
    """`squant_round` over a stacked bucket."""
    return jax.vmap(squant_round)(ws, qps)
