import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxq import LayerSpec, apply
from jaxq.rows import grouped_weight, output_positions, rows_forward, take_rows

SPECS = [
    (LayerSpec("l", "linear", has_bias=True), (3, 5, 12), (7, 12)),
    (LayerSpec("c", "conv2d", (1, 1), ((1, 1), (1, 1)), (1, 1), 1, True, (3, 3)), (2, 4, 6, 6), (8, 4, 3, 3)),
    (LayerSpec("s", "conv2d", (2, 2), ((0, 1), (0, 1)), (1, 1), 1, False, (3, 3)), (2, 4, 9, 9), (8, 4, 3, 3)),
    (LayerSpec("d", "conv2d", (1, 1), ((2, 2), (2, 2)), (2, 2), 4, True, (3, 3)), (2, 4, 7, 7), (8, 1, 3, 3)),
    (LayerSpec("w", "conv2d", (2, 2), ((1, 1), (1, 1)), (1, 1), 4, False, (3, 3)), (2, 4, 8, 8), (4, 1, 3, 3)),
    (LayerSpec("p", "conv2d", (1, 2), ((0, 0), (1, 0)), (1, 1), 2, True, (1, 2)), (1, 4, 5, 6), (6, 2, 1, 2)),
    (LayerSpec("k", "conv1d", (2,), ((1, 2),), (1,), 1, True, (3,)), (2, 3, 11), (5, 3, 3)),
]


def layer_output_at(spec: LayerSpec, y: jax.Array, index: jax.Array) -> jax.Array:
    """The layer output `y` (`[N, out, *spatial]` or `[..., out]`) at flat positions: `[m, out]`."""
    if spec.kind == "linear":
        return jnp.reshape(y, (-1, y.shape[-1]))[index]
    moved = jnp.moveaxis(y, 1, -1)
    return jnp.reshape(moved, (-1, y.shape[1]))[index]


@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS, ids=[s[0].name for s in SPECS])
def test_rows_reproduce_the_layer_output_at_every_position(spec, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape).astype(np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(w_shape[0]).astype(np.float32)) if spec.has_bias else None
    y = apply(spec, w, b, x)
    n = int(np.prod(output_positions(spec, x_shape)))
    assert n * w_shape[0] == y.size
    index = jnp.asarray(rng.permutation(n).astype(np.int32))
    got = rows_forward(grouped_weight(spec, w), b, take_rows(spec, x, index))
    np.testing.assert_allclose(got, layer_output_at(spec, y, index), rtol=1e-5, atol=1e-5)
