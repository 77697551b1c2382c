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
