"""Quantize, dequantize and fake-quantize, bit-exact with `torch.fake_quantize_*`.

    q  = clamp(round(x · (1/s)) + o, qmin, qmax)      round = half-to-even
    x̂  = (q − o) · s

Why `x · (1/s)` and not `x / s`: torch's kernels multiply by the float32 reciprocal and
add the integer offset after rounding. Dividing differs from torch in about one value per
scale, and rounding `x/s + o` in up to seven per 2 M values; the reciprocal form matches
exactly (docs/design.md §3). Rounding table (AQT-style) for a tie at s = 1, o = 0:

    x     round(x)   clamp to int8
    0.5   0          0
    1.5   2          2
   -2.5  -2         -2
  127.5  128        127
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.qparams import QParams


def _broadcastable(v: jax.Array, qp: QParams, ndim: int) -> jax.Array:
    """Reshape a per-channel vector so it broadcasts along the scheme's axis."""
    axis = qp.scheme.axis
    if axis is None or jnp.ndim(v) == 0:
        return v
    axis = axis % ndim
    shape = [1] * ndim
    shape[axis] = -1
    return jnp.reshape(v, shape)


def quantize(x: jax.Array, qp: QParams) -> jax.Array:
    """`q = clamp(round(x · (1/s)) + o, qmin, qmax)` as int32."""
    x = jnp.asarray(x, jnp.float32)
    inv_scale = _broadcastable(jnp.float32(1.0) / qp.scale, qp, x.ndim)
    offset = _broadcastable(qp.offset.astype(jnp.float32), qp, x.ndim)
    q = jnp.round(x * inv_scale) + offset
    return jnp.clip(q, qp.scheme.qmin, qp.scheme.qmax).astype(jnp.int32)


def dequantize(q: jax.Array, qp: QParams) -> jax.Array:
    """`x̂ = (q − o) · s` in float32."""
    ndim = jnp.ndim(q)
    offset = _broadcastable(qp.offset, qp, ndim)
    scale = _broadcastable(qp.scale, qp, ndim)
    return (q - offset).astype(jnp.float32) * scale


def fake_quant(x: jax.Array, qp: QParams) -> jax.Array:
    """`x̂ = (clamp(round(x · (1/s)) + o, qmin, qmax) − o) · s`, the simulated value."""
    return dequantize(quantize(x, qp), qp)
