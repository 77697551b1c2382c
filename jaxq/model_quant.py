"""The quantizer state of a whole model as arrays: bit widths and switches are arguments.

The numerics are `jaxq.numerics`' (`x̂ = (q − o)·s`, `q = clamp(round(x·(1/s)) + o, qmin, qmax)`)
with the grid `(qmin, qmax)` as arrays instead of a static `QScheme`, so one compiled
program serves every bit width, and with straight-through rounding: the forward value is
exactly the rounded one, the derivative of `round` is taken as 1 (so gradients reach the
float input inside the grid and, as in LSQ, the scale).
"""

from __future__ import annotations

import functools

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq.calibrate import quantize_weight
from jaxq.scheme import QScheme


@jax.custom_jvp
def round_ste(x: jax.Array) -> jax.Array:
    """`round` (half to even) forward, identity backward."""
    return jnp.round(x)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.round(x), dx


def grid(bits, signed=True) -> tuple[jax.Array, jax.Array]:
    """`(qmin, qmax)` of a `bits`-bit grid as float32 arrays (`bits` may be traced)."""
    bits = jnp.asarray(bits, jnp.float32)
    top = jnp.exp2(bits - 1.0)
    qmin = jnp.where(signed, -top, 0.0)
    qmax = jnp.where(signed, top - 1.0, 2.0 * top - 1.0)
    return qmin, qmax


def _along(v: jax.Array, axis: int | None, ndim: int) -> jax.Array:
    """`v` shaped to broadcast along `axis` of an `ndim`-array; as it is when per tensor or
    already one value per element (weight groups, `jaxq.groupwise.columns`)."""
    if axis is None or jnp.ndim(v) == 0 or jnp.ndim(v) == ndim:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return jnp.reshape(v, shape)


def fake_quant_ste(x, scale, offset, qmin, qmax, axis: int | None = None) -> jax.Array:
    """`x̂` of `jaxq.numerics.fake_quant` (bit-identical forward) with array grid and
    straight-through rounding; `scale`/`offset` per tensor, per channel along `axis`, or one
    per element (the shape of `x`)."""
    x32 = jnp.asarray(x, jnp.float32)
    scale = _along(jnp.asarray(scale, jnp.float32), axis, x32.ndim)
    offset = _along(jnp.asarray(offset, jnp.float32), axis, x32.ndim)
    q = jnp.clip(round_ste(x32 * (jnp.float32(1.0) / scale)) + offset, qmin, qmax)
    return ((q - offset) * scale).astype(jnp.asarray(x).dtype)


class LayerQState(NamedTuple):
    """One layer's quantizers: per-channel weight (axis 0), per-tensor input, bias correction.

    Offsets are integer-valued float32; a weight-only layer has `a_scale = 1` and is
    switched off on the input side. Weight groups (`QuantConfig.w_group_size`) give
    `w_scale`/`w_offset` the weight's shape `[out, in]`: each group's value repeated over its
    columns (`jaxq.groupwise.columns`)."""

    w_scale: jax.Array  # [out], or [out, in] for weight groups
    w_offset: jax.Array  # [out], or [out, in] for weight groups
    w_qmin: jax.Array
    w_qmax: jax.Array
    a_scale: jax.Array
    a_offset: jax.Array
    a_qmin: jax.Array
    a_qmax: jax.Array
    bias_delta: jax.Array  # [out], zero without bias correction


class Switches(NamedTuple):
    """Per-layer enable masks (1 = quantized), in the model's layer order."""

    weight: jax.Array  # [layers]
    input: jax.Array  # [layers]


def all_on(n: int, inputs=None) -> Switches:
    ones = jnp.ones((n,), jnp.float32)
    return Switches(ones, ones if inputs is None else jnp.asarray(inputs, jnp.float32))


def quantized_weight(w, state: LayerQState, on) -> jax.Array:
    """`Ŵ` where `on`, the float weight elsewhere (per channel along axis 0, or per element)."""
    wq = fake_quant_ste(w, state.w_scale, state.w_offset, state.w_qmin, state.w_qmax, axis=0)
    return jnp.where(on > 0, wq, w)


def quantized_input(x, state: LayerQState, on) -> jax.Array:
    """`x̂` where `on`, `x` elsewhere (per tensor)."""
    return jnp.where(on > 0, fake_quant_ste(x, state.a_scale, state.a_offset, state.a_qmin, state.a_qmax), x)


def corrected_bias(b, state: LayerQState, on) -> jax.Array:
    """`b + δ` where `on` (bias correction), `b` elsewhere."""
    return jnp.where(on > 0, (b.astype(jnp.float32) + state.bias_delta).astype(b.dtype), b)


@functools.partial(jax.jit, static_argnames=("scheme", "bits", "weight_range"))
def weight_qparams_for_bits(
    w: jax.Array, scheme: QScheme, bits: int, weight_range: str = "minmax"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Round-to-nearest per-channel (scale, offset, qmin, qmax) of `w` on a `bits`-bit grid
    of `scheme`'s kind and the channel ranges of `weight_range` (what `jaxq.quantize_weight`
    would give at that width)."""
    s = QScheme(bits=bits, signed=scheme.signed, symmetric=scheme.symmetric, axis=0)
    qp = quantize_weight(w, s, weight_range).qparams
    return qp.scale, qp.offset.astype(jnp.float32), jnp.float32(s.qmin), jnp.float32(s.qmax)
