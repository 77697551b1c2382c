"""Weight-only quantization of row blocks (the core of streaming checkpoint quantization).

A weight `[out, in, …]` becomes rows: per channel, one row per output channel (`in·…`
values); per group of `g`, `out·in/g` rows of `g` values. Every method below quantizes
each row on its own (`x̂ = (q − o)·s`, see `jaxq.numerics`), so any block of rows can be
quantized apart from the others, and a block is cut into fixed-size chunks run with
`lax.map(batch_size=…)`: memory is bounded by the block, compilations by the row width.

    rtn     round to nearest, min-max range per row
    admm    the per-row range refined by alternating least squares (`jaxq.admm`)
    squant  SQuant-C rounding within each row (`jaxq.squant`)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.admm import admm_quantize
from jaxq.calibrate import quantize_weight
from jaxq.scheme import QScheme
from jaxq.squant import squant_round

METHODS = ("rtn", "admm", "squant")


def row_width(shape: tuple, group_size: int | None) -> int:
    """Values per row of a weight of `shape` (`ValueError` if groups do not tile a channel)."""
    per_channel = int(np.prod(shape[1:]))
    if not group_size:
        return per_channel
    if per_channel % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {per_channel} values of each output channel")
    return group_size


def _quantize_rows(rows: jax.Array, scheme: QScheme, method: str, iters: int):
    if method == "admm":
        qw = admm_quantize(rows, scheme, iters)
        return qw.q, qw.qparams.scale, qw.qparams.offset
    qw = quantize_weight(rows, scheme)
    codes = squant_round(rows, qw.qparams) if method == "squant" else qw.q
    return codes, qw.qparams.scale, qw.qparams.offset


@functools.partial(jax.jit, static_argnames=("scheme", "method", "iters", "chunk_rows", "batch"))
def quantize_block(
    rows: jax.Array, scheme: QScheme, method: str = "rtn", iters: int = 100, chunk_rows: int = 1024, batch: int = 1
):
    """`(codes int8/int32 [R, g], scale [R], offset [R])` of a block `[R, g]`, `R` a
    multiple of `chunk_rows` (pad with zero rows; padded rows are dropped by the caller)."""
    n, width = rows.shape
    chunks = jnp.reshape(rows.astype(jnp.float32), (n // chunk_rows, chunk_rows, width))
    codes, scale, offset = jax.lax.map(lambda c: _quantize_rows(c, scheme, method, iters), chunks, batch_size=batch)
    dtype = jnp.int8 if scheme.bits <= 8 and scheme.signed else jnp.uint8 if scheme.bits <= 8 else jnp.int32
    return codes.reshape(n, width).astype(dtype), scale.reshape(n), offset.reshape(n)
