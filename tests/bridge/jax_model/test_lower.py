import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from bridge.jax_model import LoweringError, lower
from bridge.jax_model.lower import run_lowered


def test_digits_cnn_lowers_with_float_parity():
    from bridge.models.digits import digits_split, load_digits_cnn

    x = digits_split()[2][:16]
    lowered = lower(load_digits_cnn().eval(), x)
    assert lowered.parity < 1e-5
    out = np.asarray(run_lowered(lowered, x))
    with torch.no_grad():
        ref = load_digits_cnn().eval()(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_integer_buffers_stay_out_of_the_parameters_and_gradients_flow():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    lowered = lower(m, x)
    assert lowered.parity < 1e-5
    assert "1.num_batches_tracked" in lowered.buffers and "1.num_batches_tracked" not in lowered.params
    assert all(jnp.issubdtype(v.dtype, jnp.floating) for v in lowered.params.values())
    xj = jnp.asarray(x.numpy())
    grads = jax.grad(lambda p: lowered.fn(p, lowered.buffers, (xj,), {}).sum())(lowered.params)
    assert set(grads) == set(lowered.params) and float(jnp.abs(grads["0.weight"]).sum()) > 0


def test_tied_weights_are_one_parameter():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    lowered = lower(Tied().eval(), torch.randn(3, 4))
    assert lowered.parity < 1e-5
    assert "a.weight" in lowered.params and "b.weight" not in lowered.params
    assert lowered.tied == {"a.weight": ["b.weight"]}


def test_a_model_that_cannot_lower_names_the_reason_and_torch_still_works(data_dependent_model):
    m = data_dependent_model
    x = torch.randn(2, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LoweringError, match="DataDependent cannot run as a JAX function"):
        lower(m, x)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m(x)  # the torch model is unaffected
