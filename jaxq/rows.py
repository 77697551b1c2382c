"""A layer as a matrix product over input rows (im2col at sampled positions).

Every quantizable layer is, at one output position, a grouped matrix product:

    linear:  row = x[n, :]                                    y[n, :]      = W · row + b
    convNd:  row = padded x[n, :, window at output position]  y[n, :, pos] = W_g · row_g + b

With `g` groups, rows are `[m, g, d]` (`d = C_in/g · kh · kw`) and the weight is viewed as
`[g, out/g, d]`. Reconstruction algorithms (EasyQuant, AdaRound) work on a sample of `m`
rows per layer instead of whole activations: the same math, a fraction of the cost.
Fake-quantizing the input commutes with taking rows (padding is 0, and 0 is exact on
every grid), so `rows(x̂) = fq(rows(x))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq.layers import LayerSpec


def grouped_shape(spec: LayerSpec, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """`[g, out/g, d]`: the shape `grouped_weight` gives a weight of `shape`."""
    g = spec.groups if spec.kind != "linear" else 1
    return g, shape[0] // g, int(np.prod(shape)) // shape[0]


def grouped_weight(spec: LayerSpec, w: jax.Array) -> jax.Array:
    """`W [out, C_in/g, *kernel]` (or `[out, in]`) → `[g, out/g, d]`."""
    return jnp.reshape(w, grouped_shape(spec, tuple(w.shape)))


def output_positions(spec: LayerSpec, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """`(N, *out_spatial)` for a conv input `[N, C, *spatial]`, `(rows,)` for a linear one."""
    if spec.kind == "linear":
        return (int(np.prod(input_shape[:-1])),)
    out = []
    for size, (lo, hi), s, dil, k in zip(input_shape[2:], spec.padding, spec.stride, spec.dilation, spec.kernel):
        out.append((size + lo + hi - dil * (k - 1) - 1) // s + 1)
    return (input_shape[0], *out)


def take_rows(spec: LayerSpec, x: jax.Array, index: jax.Array) -> jax.Array:
    """Rows `[m, g, d]` of input `x` at flat output positions `index` (`[m]` int32).

    `index` enumerates `output_positions(spec, x.shape)` in C order.
    """
    if spec.kind == "linear":
        flat = jnp.reshape(x, (-1, x.shape[-1]))
        return flat[index][:, None, :]
    positions = output_positions(spec, x.shape)
    coords = jnp.unravel_index(index, positions)
    xp = jnp.pad(x, ((0, 0), (0, 0), *spec.padding))
    extent = tuple(dil * (k - 1) + 1 for dil, k in zip(spec.dilation, spec.kernel))

    def window(n, *pos):
        start = (n, 0, *(p * s for p, s in zip(pos, spec.stride)))
        patch = lax.dynamic_slice(xp, start, (1, x.shape[1], *extent))[0]
        return patch[(slice(None), *(slice(None, None, dil) for dil in spec.dilation))]

    patches = jax.vmap(window)(*coords)  # [m, C, *kernel]
    return jnp.reshape(patches, (index.shape[0], spec.groups, -1))


def rows_forward(wg: jax.Array, b: jax.Array | None, rows: jax.Array) -> jax.Array:
    """`y [m, out] = rows · W_gᵀ (+ b)` for rows `[m, g, d]` and weight `[g, out/g, d]`."""
    if wg.shape[1] == 1:  # depthwise: a multiply-add per group beats g tiny matmuls on CPU
        y = jnp.sum(rows * wg[:, 0, :], axis=-1)
    else:
        y = jnp.einsum("mgd,god->mgo", rows, wg, precision=lax.Precision.HIGHEST)
        y = jnp.reshape(y, (rows.shape[0], -1))
    return y if b is None else y + b
