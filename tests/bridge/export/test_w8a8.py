import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from bridge import Calibrator, ExportError, W8A8Error, load_quantized
from bridge.inplace.fakequant import model_quantizers
from bridge.inplace.modules import layer_spec
from bridge.export.w8a8 import W8A8OverflowWarning, integer_bias, integer_forward
from jaxq import QuantConfig


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.conv1d = nn.Conv1d(8, 4, 3, padding=2, dilation=2)
        self.fc = nn.Linear(4 * 36, 5)
        self.fc_nobias = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = self.dw(torch.relu(self.conv(x)))  # dw sees signed values after relu? no: relu'd
        h = self.conv1d(h.flatten(2).mean(-1, keepdim=True).expand(-1, -1, 36) - 0.1)
        return self.fc_nobias(torch.tanh(self.fc(h.flatten(1))))


@pytest.mark.parametrize(
    "a_signed,dead_channels,bias_correction",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
)
def test_integer_path_reproduces_fake_quant_layers(a_signed, dead_channels, bias_correction, tmp_path):
    torch.manual_seed(0)
    model = Mixed().eval()
    if dead_channels:  # all-zero weights with a bias: b / deq would overflow int32 at the EPS scale
        with torch.no_grad():
            model.conv.weight[2], model.conv.bias[2] = 0.0, 50.0
            model.fc.weight[1], model.fc.bias[1] = 0.0, -30.0
    data = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    cfg = QuantConfig(
        quant_mode=1,
        act_method=1,
        quantize_first_last=True,
        a_signed=a_signed,
        bias_correction=bias_correction,
        recon_rows=64,
    )
    cal = Calibrator(model, cfg, data, progress=False).run()
    if bias_correction:  # bias-less layers carry δ in a bias of their own
        assert all(
            w.bias_correction is not None and w.module.bias is not None for w in model_quantizers(cal.model).values()
        )
    cal.export_quant_safetensor(tmp_path)
    t = load_file(str(tmp_path / "quant_model_weight_w8a8.safetensors"))
    desc = json.loads((tmp_path / "quant_model_description_w8a8.json").read_text())
    assert desc["model_quant_type"] == "W8A8"
    inputs = {}
    for n, w in model_quantizers(cal.model).items():  # the float input each layer quantizes
        w.listeners.append(lambda x, n=n: inputs.__setitem__(n, x))
    with torch.no_grad():
        cal.model(data[0])
    for w in model_quantizers(cal.model).values():
        w.listeners.clear()
    scheme = cfg.act_scheme
    for name, w in model_quantizers(cal.model).items():
        assert t[f"{name}.weight"].dtype == np.int8 and t[f"{name}.quant_bias"].dtype == np.int32
        assert desc[f"{name}.weight"] == "W8A8"
        assert (f"{name}.bias" in t) == (w.module.bias is not None)
        with torch.no_grad():
            ref = w.module(inputs[name])
        out = integer_forward(layer_spec(name, w.module), t, name, inputs[name], scheme.qmin, scheme.qmax, a_signed)
        deq = torch.from_numpy(t[f"{name}.deq_scale"])
        view = (1, -1) + (1,) * (ref.dim() - 2) if ref.dim() > 2 else (1, -1)
        # exact up to rounding b/deq (≤ deq/2) and float32 accumulation
        tol = deq.reshape(view) * 0.51 + 1e-5 * ref.abs().max()
        assert torch.all((out - ref).abs() <= tol), (name, float((out - ref).abs().max()))
        if not a_signed:
            assert float(t[f"{name}.input_offset"][0]) == float(w.input_offset) - 128
    if dead_channels:
        assert t["conv.deq_scale"][2] == np.float32(50 / 2**30) and t["conv.quant_bias"][2] == 2**30
        assert t["fc.quant_bias"][1] == -(2**30)


def test_a_quant_bias_that_does_not_fit_int32_is_saturated_with_a_warning_naming_it():
    w_q = np.array([[1, -2], [3, 4]])
    deq = np.array([1e-3, 1e-12], np.float32)
    q, d = integer_bias("blocks.1.fc", np.array([0.5, 0.0]), deq[:1].repeat(2), w_q, o8=0)
    assert q.tolist() == [500, 0] and d.tolist() == deq[:1].repeat(2).tolist()
    with pytest.warns(W8A8OverflowWarning, match=r"blocks\.1\.fc: quant_bias of output channel\(s\) \[1\]"):
        q, _ = integer_bias("blocks.1.fc", np.array([0.5, -0.5]), deq, w_q, o8=0)
    assert q.tolist() == [500, np.iinfo(np.int32).min]


def test_float_tensors_are_marked_float(digits_model, digits_calib, tmp_path):
    cal = Calibrator(digits_model, QuantConfig(quant_mode=1, act_method=1), digits_calib, progress=False).run()
    files = cal.export_quant_safetensor(tmp_path, "w.safetensors", "d.json")
    assert [f.name for f in files] == ["w.safetensors", "d.json"]
    desc = json.loads((tmp_path / "d.json").read_text())
    t = load_file(str(tmp_path / "w.safetensors"))
    assert desc["features.0.weight"] == "FLOAT" and t["features.0.weight"].dtype == np.float32  # kept float
    assert desc["features.3.weight"] == "W8A8"
    assert set(desc) - {"model_quant_type"} == set(t)


def test_w8a8_refuses_what_it_cannot_express(digits_model, digits_calib, tmp_path):
    cal = Calibrator(
        digits_model, QuantConfig(quant_mode=1, act_method=1, w_sym=False), digits_calib, progress=False
    ).run()
    with pytest.raises(W8A8Error, match="w_sym=False"):
        cal.export_quant_safetensor(tmp_path)
    cal.restore()
    with pytest.raises(ExportError, match="plain file name"):
        Calibrator(
            digits_model, QuantConfig(quant_mode=1, act_method=1), digits_calib, progress=False
        ).run().export_quant_safetensor(tmp_path, "a/b.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_reload_is_bit_identical_without_data(digits_calib, tmp_path):
    from bridge.models.digits import load_digits_cnn

    cal = Calibrator(
        load_digits_cnn(),
        QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True),
        digits_calib,
        progress=False,
    ).run()
    cal.export_param(tmp_path)
    fresh = load_quantized(load_digits_cnn(), tmp_path)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), cal.model(x))
    # and into a calibrator that never ran
    other = Calibrator(
        load_digits_cnn(),
        QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True),
        digits_calib,
        progress=False,
    ).load_param(tmp_path)
    with torch.no_grad():
        assert torch.equal(other.model(x), cal.model(x))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(other.get_quant_params(), cal.get_quant_params()) for k in a)


def test_reload_errors(tmp_path, digits_model):
    with pytest.raises(FileNotFoundError, match="not a jaxq parameter directory"):
        load_quantized(digits_model, tmp_path)


def test_torch_export_and_compile(digits_model, digits_calib):
    # with bias correction: the bias parametrization traces (the ONNX export tests run torch.export on it)
    cfg = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, bias_correction=True)
    cal = Calibrator(digits_model, cfg, digits_calib, progress=False).run()
    x = digits_calib[0][:8]
    with torch.no_grad():
        ref = cal.model(x)
    exported = torch.export.export(cal.model, (x,))
    assert torch.equal(exported.module()(x), ref)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("fake_quantize_per_channel" in o for o in ops) and any("fake_quantize_per_tensor" in o for o in ops)
    compiled = torch.compile(cal.model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=0, atol=1e-5)
