import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from bridge.jax_model import lower
from bridge.jax_model.ops import depthwise_conv2d, pointwise_conv2d


@pytest.mark.parametrize("k, stride, pad", [(3, 1, 1), (5, 2, 2), (3, 2, 0), (5, 1, 2)])
def test_depthwise_shifted_sum_equals_convolution(k, stride, pad):
    x = jax.random.normal(jax.random.key(0), (2, 6, 11, 13))
    w = jax.random.normal(jax.random.key(1), (6, 1, k, k))
    ref = jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        ((pad, pad), (pad, pad)),
        feature_group_count=6,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    np.testing.assert_allclose(np.asarray(depthwise_conv2d(x, w, (stride,), (pad,))), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize(
    "kh, kw, sh, sw, ph, pw, h, w",
    [(3, 3, 2, 2, 1, 1, 11, 13), (5, 5, 2, 2, 2, 2, 10, 9), (1, 3, 1, 2, 0, 1, 7, 8), (5, 3, 3, 1, 0, 2, 12, 5)],
)
def test_depthwise_gradients_equal_the_convolutions(kh, kw, sh, sw, ph, pw, h, w):
    """The hand-written backward pass (`ops._depthwise_bwd`) against autodiff of XLA's
    grouped convolution, with output sizes whose stride leaves input rows unread."""
    x = jax.random.normal(jax.random.key(0), (2, 3, h, w))
    k = jax.random.normal(jax.random.key(1), (3, 1, kh, kw))

    def conv(x, k):
        dims = ("NCHW", "OIHW", "NCHW")
        return jax.lax.conv_general_dilated(
            x, k, (sh, sw), ((ph, ph), (pw, pw)), feature_group_count=3, dimension_numbers=dims
        )

    g = jax.random.normal(jax.random.key(2), conv(x, k).shape)
    ours = jax.jit(jax.grad(lambda x, k: jnp.sum(depthwise_conv2d(x, k, (sh, sw), (ph, pw)) * g), argnums=(0, 1)))(x, k)
    ref = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) * g), argnums=(0, 1)))(x, k)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5)
    under_vmap = jax.jit(
        jax.vmap(jax.grad(lambda x, k: jnp.sum(depthwise_conv2d(x, k, (sh, sw), (ph, pw)) * g), argnums=1))
    )
    np.testing.assert_allclose(np.asarray(under_vmap(x[None], k[None])[0]), np.asarray(ref[1]), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_einsum_equals_convolution(stride):
    x = jax.random.normal(jax.random.key(0), (2, 6, 9, 9))
    w = jax.random.normal(jax.random.key(1), (4, 6, 1, 1))
    ref = jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    np.testing.assert_allclose(np.asarray(pointwise_conv2d(x, w, (stride,))), np.asarray(ref), atol=1e-5)


def test_models_with_depthwise_pointwise_and_other_convs_lower_with_parity():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.Conv2d(8, 16, 1),
        nn.Conv2d(16, 16, 3, padding="same", groups=16),
        nn.Conv2d(16, 4, 1, stride=2),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, dilation=2, groups=4, padding=2),
    ).eval()
    lowered = lower(m, torch.randn(2, 3, 17, 17))
    assert lowered.parity < 1e-5
    assert jnp.issubdtype(next(iter(lowered.params.values())).dtype, jnp.floating)
