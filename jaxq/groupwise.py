"""Weights quantized per group of input columns (W4A16 g128 and the like).

A weight `W [o, d]` with group size `g` (`d` a multiple of `g`) has one scale and offset
per output row and group, `[o, d/g]`: `Ŵ[r, c] = (q[r, c] − o[r, c//g])·s[r, c//g]`
(`jaxq.numerics`). `group_size=None` is one group per row (per channel). The range of a
group is its min–max (round to nearest, RTN); GPTQ and AWQ choose codes and scales on top.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.calibrate import QuantizedWeight, quantize_weight
from jaxq.numerics import fake_quant, quantize
from jaxq.qparams import QParams
from jaxq.scheme import QScheme


def check_group_size(width: int, group_size: int | None, what: str = "weight") -> int:
    """The group width for rows of `width` values (`ValueError` naming `what` if `group_size` does not tile them)."""
    if group_size is None:
        return width
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: an int ≥ 1, or None for one group per output channel")
    if width % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {width} input columns of {what}")
    return group_size


def group_qparams(w: jax.Array, scheme: QScheme, group_size: int | None) -> QParams:
    """Min–max scale and offset `[o, d/g]` of `w [o, d]`."""
    o, d = w.shape
    g = check_group_size(d, group_size)
    qp = quantize_weight(jnp.reshape(w, (o * (d // g), g)), scheme.with_axis(0)).qparams
    return QParams(jnp.reshape(qp.scale, (o, d // g)), jnp.reshape(qp.offset, (o, d // g)), qp.scheme)


def per_column(v: jax.Array, width: int) -> jax.Array:
    """A per-group array `[o, G]` repeated to one value per column `[o, width]`."""
    return jnp.repeat(v, width // v.shape[1], axis=1)


def columns(qp: QParams, width: int) -> QParams:
    """Group parameters `[o, G]` as elementwise parameters `[o, width]` (`jaxq.numerics` applies them)."""
    return QParams(per_column(qp.scale, width), per_column(qp.offset, width), qp.scheme.with_axis(None))


def group_fake_quant(w: jax.Array, qp: QParams) -> jax.Array:
    """`Ŵ` of `w [o, d]` under group parameters `qp` `[o, G]` (round to nearest)."""
    return fake_quant(w, columns(qp, w.shape[1]))


def dequantize_codes(codes: jax.Array, qp: QParams) -> jax.Array:
    """`Ŵ = (q − o)·s` of codes `[o, d]` under group parameters `[o, G]`."""
    d = codes.shape[1]
    return (codes.astype(jnp.float32) - per_column(qp.offset, d)) * per_column(qp.scale, d)


@functools.partial(jax.jit, static_argnames=("scheme", "group_size"))
def rtn(w: jax.Array, scheme: QScheme, group_size: int | None):
    """`(codes int32 [o, d], QParams [o, G])`: round to nearest in each group's min–max range."""
    qp = group_qparams(w.astype(jnp.float32), scheme, group_size)
    return quantize(w, columns(qp, w.shape[1])), qp


def group_rows(w, group_size: int):
    """`w [o, d]` read as one row per group, `[o·d/g, g]`: per-channel code (`jaxq.calibrate`)
    on these rows is group-wise quantization of `w` (a view for NumPy arrays)."""
    o, d = w.shape
    return w.reshape(o * (d // check_group_size(d, group_size)), group_size)


def from_group_rows(qw: QuantizedWeight, shape: tuple[int, int]) -> QuantizedWeight:
    """A `QuantizedWeight` of `group_rows` (scales `[o·G]`, codes `[o·G, g]`) as the weight's
    own: codes `[o, d]` and elementwise parameters `[o, d]` (`columns`), the form the
    pipeline's steps read (GPTQ, bias correction)."""
    o, d = shape
    qp = QParams(jnp.reshape(qw.qparams.scale, (o, -1)), jnp.reshape(qw.qparams.offset, (o, -1)), qw.qparams.scheme)
    return QuantizedWeight(columns(qp, d), jnp.reshape(qw.q, shape))


def group_params(scale, offset, group_size: int) -> tuple:
    """Elementwise parameters `[o, d]` (`columns`) back to one per group, `[o, d/g]`."""
    return scale[:, ::group_size], offset[:, ::group_size]
