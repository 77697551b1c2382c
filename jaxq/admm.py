"""ADMM weight-scale refinement (msModelSlim `keep_acc['admm']`), per output channel.

Alternating least squares on each channel's quantizer, starting from the round-to-nearest
one of `weight_range` (`jaxq.weight_range`: min-max, or the grid search of least error):

    symmetric:   q = clamp(round(W · (1/s)), qmin, qmax)         s ← ⟨W, q⟩ / ⟨q, q⟩
    asymmetric:  q = clamp(round(W · (1/s)) + o, qmin, qmax)     (a, c) ← argmin ‖W − (a·q + c)‖²
                                                                s ← a,  o ← clamp(round(−c / a))

Every step's quantizer is scored by the channel's weight error ‖W − (q − o)·s‖², and the
best one seen is kept (the start included), so the result is never worse than
round-to-nearest on any channel. A step replaces the best only when it lowers the error by
more than `MIN_GAIN` (relative): smaller gains are float32 summation noise, and "never
worse" must hold however the error is summed. The loop stops after `iters` steps or as soon as the
scales stop changing (a fixed point of the alternation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.calibrate import QuantizedWeight, quantize_weight
from jaxq.numerics import dequantize, quantize
from jaxq.qparams import EPS, QParams
from jaxq.scheme import QScheme

MIN_GAIN = 1e-4


def channel_errors(w2: jax.Array, qp: QParams) -> jax.Array:
    """`‖W_c − (q_c − o_c)·s_c‖²` per channel of a `[channels, elements]` weight."""
    return jnp.sum((dequantize(quantize(w2, qp), qp) - w2) ** 2, axis=1)


def least_squares_step(w2: jax.Array, qp: QParams) -> QParams:
    """One alternation: round with `qp`, then refit scale (and offset) per channel."""
    scheme = qp.scheme
    q = quantize(w2, qp).astype(jnp.float32)
    if scheme.symmetric:
        qq = jnp.sum(q * q, axis=1)
        wq = jnp.sum(w2 * q, axis=1)
        ok = (qq > 0) & (wq > 0)
        scale = jnp.where(ok, wq / jnp.where(ok, qq, 1.0), qp.scale)
        return QParams(jnp.maximum(scale, EPS), qp.offset, scheme)
    q_mean = jnp.mean(q, axis=1, keepdims=True)
    w_mean = jnp.mean(w2, axis=1, keepdims=True)
    var_q = jnp.sum((q - q_mean) ** 2, axis=1)
    cov = jnp.sum((q - q_mean) * (w2 - w_mean), axis=1)
    ok = (var_q > 0) & (cov > 0)
    a = jnp.where(ok, cov / jnp.where(ok, var_q, 1.0), qp.scale)
    a = jnp.maximum(a, EPS)
    c = w_mean[:, 0] - a * q_mean[:, 0]
    offset = jnp.clip(jnp.round(-c / a), scheme.qmin, scheme.qmax).astype(jnp.int32)
    return QParams(a, jnp.where(ok, offset, qp.offset), scheme)


def admm_quantize(w: jax.Array, scheme: QScheme, iters: int, weight_range: str = "minmax") -> QuantizedWeight:
    """Per-channel quantizer of `w` (axis 0) refined by up to `iters` alternations."""
    w = jnp.asarray(w, jnp.float32)
    w2 = jnp.reshape(w, (w.shape[0], -1))
    start = quantize_weight(w, scheme, weight_range).qparams
    flat_scheme = scheme.with_axis(0)  # channels are rows of w2
    start = QParams(start.scale, start.offset, flat_scheme)

    def cond(carry):
        i, _, _, _, moved = carry
        return (i < iters) & moved

    def body(carry):
        i, qp, best, best_err, _ = carry
        new = least_squares_step(w2, qp)
        err = channel_errors(w2, new)
        better = err < best_err * (1 - MIN_GAIN)
        best = QParams(
            jnp.where(better, new.scale, best.scale), jnp.where(better, new.offset, best.offset), flat_scheme
        )
        moved = jnp.any(new.scale != qp.scale) | jnp.any(new.offset != qp.offset)
        return i + 1, new, best, jnp.where(better, err, best_err), moved

    init = (jnp.int32(0), start, start, channel_errors(w2, start), jnp.bool_(True))
    _, _, best, _, _ = jax.lax.while_loop(cond, body, init)
    qp = QParams(best.scale, best.offset, scheme)
    return QuantizedWeight(qp, quantize(w, qp))


@functools.partial(jax.jit, static_argnames=("scheme", "iters", "weight_range"))
def admm_quantize_bucket(ws: jax.Array, scheme: QScheme, iters: int, weight_range: str = "minmax") -> QuantizedWeight:
    """`admm_quantize` over a stacked bucket `ws: [layers, *shape]`."""
    return jax.vmap(lambda w: admm_quantize(w, scheme, iters, weight_range))(ws)
