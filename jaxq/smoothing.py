"""SmoothQuant (Xiao et al. 2023): move activation range into the weights, per input channel.

For a linear layer `y = x·Wᵀ` and factors `s > 0` over its input channels `j`:

    y = (x / s) · (W·diag(s))ᵀ,        s_j = max|X_j|^α / max_k |W_kj|^(1−α)

so an input channel with outliers is divided down before per-tensor activation
quantization and its weight column multiplied up before per-output-channel weight
quantization. `α` (0…1) sets how much of the range moves. Layers that read one tensor
(attention's q, k, v projections) share one `s`, computed from the maximum over their
weights, so the division can happen once, before all of them.

`search_alpha` picks `α` from a grid (or no smoothing) by the output error of the quantized layer group on
sampled input rows, `Σ‖Q_a(x/s)·Q_w(W·s)ᵀ − x·Wᵀ‖²`, with the activation range the
min-max of `x/s` over the calibration data and round-to-nearest weights.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq.calibrate import quantize_weight
from jaxq.numerics import dequantize, fake_quant
from jaxq.qparams import qparams_from_range
from jaxq.scheme import QScheme

FACTOR_RANGE = (1e-5, 1e5)  # s is clipped here: a dead channel must not make W·s overflow or vanish


class ChannelRange(NamedTuple):
    """Per input channel minimum and maximum of a layer's input over the calibration data."""

    lo: jax.Array  # [in]
    hi: jax.Array  # [in]


def smoothing_factors(act_absmax: jax.Array, weight_absmax: jax.Array, alpha) -> jax.Array:
    """`s_j = a_j^α / w_j^(1−α)` (module doc); 1 where a channel's input or weight is all zero."""
    a = jnp.asarray(act_absmax, jnp.float32)
    w = jnp.asarray(weight_absmax, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    live = (a > 0) & (w > 0)
    s = jnp.power(jnp.where(live, a, 1.0), alpha) / jnp.power(jnp.where(live, w, 1.0), 1.0 - alpha)
    return jnp.where(live, jnp.clip(s, *FACTOR_RANGE), 1.0)


def weight_column_absmax(weight: jax.Array) -> jax.Array:
    """`max_k |W_kj|` of a `[out, in]` weight (of the layers' weights stacked along `out`)."""
    return jnp.max(jnp.abs(weight), axis=0)


def smoothed_error(
    rows: jax.Array, channel_range: ChannelRange, weight: jax.Array, s: jax.Array, w_scheme: QScheme, a_scheme: QScheme
) -> jax.Array:
    """Mean squared output error of the smoothed, quantized layer on `rows [n, in]`."""
    x = rows / s
    act = qparams_from_range(jnp.min(channel_range.lo / s), jnp.max(channel_range.hi / s), a_scheme)
    qw = quantize_weight(weight * s, w_scheme)
    y = fake_quant(x, act) @ dequantize(qw.q, qw.qparams).T
    return jnp.mean(jnp.square(y - rows @ weight.T))


@functools.partial(jax.jit, static_argnames=("w_scheme", "a_scheme"))
def search_alpha(
    rows: jax.Array,
    channel_range: ChannelRange,
    weight: jax.Array,
    alphas: jax.Array,
    w_scheme: QScheme,
    a_scheme: QScheme,
) -> tuple[jax.Array, jax.Array]:
    """`(s, errors)`: the factors with the least `smoothed_error` among no smoothing
    (`s = 1`, `errors[0]`) and every `α` of `alphas` (`errors[1:]`), one `vmap` over all.

    `weight` is the group's weights stacked along the output axis (per-output-channel
    quantization makes that the same as quantizing each)."""
    a_max = jnp.maximum(jnp.abs(channel_range.lo), jnp.abs(channel_range.hi))
    w_max = weight_column_absmax(weight)
    factors = jax.vmap(lambda alpha: smoothing_factors(a_max, w_max, alpha))(jnp.asarray(alphas, jnp.float32))
    factors = jnp.concatenate([jnp.ones_like(factors[:1]), factors])
    errors = jax.vmap(lambda s: smoothed_error(rows, channel_range, weight, s, w_scheme, a_scheme))(factors)
    return factors[jnp.argmin(errors)], errors
