"""jaxq.layers.apply against the torch modules it describes."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from bridge.inplace.modules import layer_spec
from jaxq import LayerSpec, apply

CASES = [
    (nn.Linear(7, 5), (3, 4, 7)),
    (nn.Linear(7, 5, bias=False), (2, 7)),
    (nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2), (2, 4, 17)),
    (nn.Conv1d(4, 8, 5, groups=4, bias=False), (2, 4, 16)),
    (nn.Conv2d(3, 8, 3), (2, 3, 9, 11)),
    (nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 4, 10, 12)),
    (nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False), (2, 6, 8, 8)),  # depthwise
    (nn.Conv2d(6, 12, 3, groups=3, stride=2), (1, 6, 9, 9)),
]


@pytest.mark.parametrize("module, shape", CASES, ids=lambda c: str(c) if isinstance(c, tuple) else type(c).__name__)
def test_apply_matches_torch(module, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    spec = layer_spec("layer", module)
    b = None if module.bias is None else jnp.asarray(module.bias.detach().numpy())
    ours = apply(spec, jnp.asarray(module.weight.detach().numpy()), b, jnp.asarray(x.numpy()))
    with torch.no_grad():
        ref = module(x).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_spec_validation():
    with pytest.raises(ValueError, match="kind"):
        LayerSpec("x", "conv3d")
    with pytest.raises(ValueError, match="stride"):
        LayerSpec("x", "conv2d", stride=(1,), padding=((0, 0), (0, 0)), dilation=(1, 1))
