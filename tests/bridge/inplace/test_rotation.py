"""`QuantConfig.rotate_inputs`: each quantized Linear layer's input rotated online."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import jaxq
from bridge import Calibrator
from bridge.export import ExportError
from bridge.inplace.rotation import InputRotation, rotation_of
from jaxq.rotation import random_hadamard

CFG = jaxq.QuantConfig(w_bit=4, a_bit=8, quantize_first_last=True, bias_correction=False)


class Mlp(nn.Module):
    """Heavy-tailed weights (Student's t, as trained transformers' are; uniform random
    weights have no outliers for a rotation to spread) and residual inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.head = nn.Linear(48, 96), nn.Linear(96, 48), nn.Linear(48, 10)
        t = torch.distributions.StudentT(2.0)
        with torch.no_grad():
            for layer in (self.up, self.down, self.head):
                layer.weight.copy_(t.sample(layer.weight.shape) * 0.05)

    def forward(self, x):
        return self.head(x + self.down(torch.relu(self.up(x))))


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 48, generator=g) for _ in range(n)]
    for b in batches:
        b[:, 5] *= 30  # one outlier channel, as transformers' residual streams have
    return batches


def _out(model, data):
    with torch.no_grad():
        return torch.cat([model(x) for x in data])


@settings(max_examples=20, deadline=None)
@given(width=st.sampled_from([8, 48, 96, 384]), seed=st.integers(0, 1000))
def test_the_hook_multiplies_by_the_orthogonal_random_hadamard_matrix(width, seed):
    q = random_hadamard(width, seed)
    np.testing.assert_allclose(q @ q.T, np.eye(width), atol=1e-12)
    x = torch.randn(3, 5, width, dtype=torch.float64)
    np.testing.assert_allclose(InputRotation(width, seed).rotate(x).numpy(), x.numpy() @ q, atol=1e-12)


def test_rotation_keeps_the_float_function_lowers_the_error_and_restore_leaves_no_trace():
    data, model = _data(), Mlp().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = _out(model, data)
    errors = {}
    for rotate in (False, True):
        cal = Calibrator(model, CFG.replace(rotate_inputs=rotate), data, progress=False).run()
        assert all((rotation_of(q.module) is not None) == rotate for q in cal.quantizers.values())
        with cal.quantization(False):
            torch.testing.assert_close(_out(model, data), fp, rtol=1e-5, atol=1e-4)
        errors[rotate] = float((_out(model, data) - fp).pow(2).mean())
        cal.restore()
        assert not any(rotation_of(m) for m in model.modules())
        after = model.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert errors[True] < 0.5 * errors[False]


@pytest.mark.parametrize(
    "export",
    [
        lambda cal, path: cal.export_param(path),
        lambda cal, path: cal.export_quant_safetensor(path),
        lambda cal, path: cal.export_quant_onnx("m", path, example_batch=_data(1)[0]),
    ],
    ids=["param", "w8a8", "onnx"],
)
def test_exports_refuse_rotated_layers_by_name(export, tmp_path):
    cal = Calibrator(Mlp().eval(), CFG.replace(w_bit=8, rotate_inputs=True), _data(), progress=False).run()
    with pytest.raises(ExportError, match=r"rotate their inputs.*'up'.*rotate_inputs=False"):
        export(cal, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_jax_model_rotates_as_the_torch_model_does():
    import jax

    from bridge.jax_model.lower import to_jax_tree

    data, model = _data(), Mlp().eval()
    cal = Calibrator(model, CFG.replace(rotate_inputs=True), data, progress=False).run()
    qf = cal.jax_forward(data[0])
    lw = qf.lowered
    out = np.asarray(
        jax.jit(qf.fn)(lw.params, lw.buffers, qf.state, qf.default_switches(), to_jax_tree((data[1],)), {})
    )
    with torch.no_grad():
        tq, tf = model(data[1]).numpy(), None
        with cal.quantization(False):
            tf = model(data[1]).numpy()
    quant_error = np.abs(tq - tf).mean()
    assert np.abs(out - tq).mean() < 0.01 * quant_error


def test_the_field_is_a_bool():
    with pytest.raises(TypeError, match=r"rotate_inputs=1 must be True or False"):
        jaxq.QuantConfig(rotate_inputs=1)


@pytest.mark.parametrize("keep_acc", [{"gptq": True}, {"qdrop": [True, 40]}], ids=["gptq", "qdrop"])
def test_fitting_steps_fit_the_rotated_layers(keep_acc):
    """GPTQ's rows and QDrop's blocks (lowered to JAX) read the rotated inputs: both run and
    do no worse than round to nearest on the same rotation."""
    data, model = _data(), Mlp().eval()
    fp = _out(model, data)
    errors = {}
    for name, acc in (("nearest", {}), ("fitted", keep_acc)):
        cal = Calibrator(model, CFG.replace(rotate_inputs=True, keep_acc=acc), data, progress=False).run()
        errors[name] = float((_out(model, data) - fp).pow(2).mean())
        cal.restore()
    assert errors["fitted"] <= errors["nearest"]
