"""SmoothQuant on pointwise (1×1, ungrouped) convolutions: which layers get factors, the
arithmetic `conv(Q(x / s), Q(W·diag(s)))`, float when off, restore, export and reload, the
JAX model, bias correction and GPTQ on the smoothed input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaxq
from bridge import Calibrator, load_quantized
from bridge.inplace.fakequant import model_quantizers
from tests.bridge.layer_io import seen_io


class PointwiseNet(nn.Module):
    """A MobileNet block: 3×3 stem, pointwise expand, depthwise, pointwise project whose input
    has one outlier channel, then a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        with torch.no_grad():
            self.dw.weight[5] *= 30.0
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.expand(torch.relu(self.stem(x))))
        h = self.project(self.dw(h))
        return self.head(h.mean((2, 3)))


CFG = jaxq.QuantConfig(quant_mode=1, act_method=1, minmax_combine="running", quantize_first_last=True)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]


def _out(model, batches):
    with torch.no_grad():
        return torch.cat([model(x) for x in batches])


def test_pointwise_convolutions_and_linear_layers_are_smoothed_others_not(calib):
    cal = Calibrator(PointwiseNet(), CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    smoothed = {n for n, r in cal.records.items() if r.smoothing is not None}
    assert smoothed == {"expand", "project", "head"}  # not the 3×3 stem, not the depthwise conv
    s = cal.records["project"].smoothing
    assert s.shape == (16,) and s[5] > 3 * np.median(s)  # the outlier channel is divided down


def test_a_smoothed_pointwise_conv_computes_conv_of_fq_x_over_s_and_fq_w_times_s(calib):
    m = PointwiseNet()
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    rec = cal.records["project"]
    seen = seen_io(m.project, m, calib[0])
    with torch.no_grad():
        s = torch.from_numpy(rec.smoothing)
        a = cal.cfg.act_scheme
        xq = torch.fake_quantize_per_tensor_affine(
            seen["x"] / s[:, None, None], float(rec.input_scale), int(rec.input_offset), a.qmin, a.qmax
        )
        w = m.project.parametrizations.weight.original * s[:, None, None]
        wq = torch.fake_quantize_per_channel_affine(
            w, torch.tensor(rec.weight_scale), torch.tensor(rec.weight_offset), 0, -128, 127
        )
        expected = F.conv2d(xq, wq, m.project.bias)
    torch.testing.assert_close(seen["y"], expected, rtol=0, atol=0)


def test_smoothing_brings_the_quantized_model_closer_to_float(calib):
    fp = _out(PointwiseNet(), calib)
    err = {}
    for sq in (None, 0.5):
        m = PointwiseNet()
        Calibrator(m, CFG.replace(smooth_quant=sq, w_bit=4, a_bit=8), calib, progress=False).run()
        err[sq] = float((_out(m, calib) - fp).pow(2).mean())
    assert err[0.5] < err[None]


def test_quantization_off_is_the_float_model_and_restore_leaves_no_trace(calib):
    m = PointwiseNet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fp = _out(PointwiseNet(), calib)
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    with cal.quantization(False):
        torch.testing.assert_close(_out(m, calib), fp, rtol=0, atol=0)
    cal.restore()
    assert not model_quantizers(m)
    after = m.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_export_and_reload_rebuild_the_smoothed_model(calib, tmp_path):
    m = PointwiseNet()
    cal = Calibrator(m, CFG.replace(smooth_quant=True), calib, progress=False).run()
    cal.export_param(tmp_path / "p")
    reloaded = load_quantized(PointwiseNet(), tmp_path / "p")
    assert torch.equal(_out(reloaded, calib), _out(m, calib))


@pytest.mark.parametrize("keep_acc", [{}, {"gptq": True}])
def test_bias_correction_and_gptq_read_the_smoothed_input(calib, keep_acc):
    """Both sample the quantizer's input `x / s` of a convolution (their geometry checks
    compare the rows with the layer's output through `W·diag(s)`): no error, and the factors
    stay on every smoothed layer."""
    cfg = CFG.replace(smooth_quant=0.5, w_bit=4, bias_correction=True, keep_acc=keep_acc)
    cal = Calibrator(PointwiseNet(), cfg, calib, progress=False).run()
    assert cal.records["project"].bias_correction is not None
    assert {n for n, r in cal.records.items() if r.smoothing is not None} == {"expand", "project", "head"}
    assert cal.output_cosine > 0.9


@pytest.mark.slow
def test_the_jax_model_computes_the_smoothed_convolutions(calib):
    import jax
    import jax.numpy as jnp

    from bridge.jax_model.lower import to_jax_tree
    from jaxq.model_quant import Switches

    m = PointwiseNet()
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    qf = cal.jax_forward(calib[0])
    assert set(qf.smoothing) == {"expand", "project", "head"}
    x, lw = calib[1], qf.lowered
    run = jax.jit(qf.fn)
    out = np.asarray(run(lw.params, lw.buffers, qf.state, qf.default_switches(), to_jax_tree((x,)), {}))
    zeros = jnp.zeros(len(qf.layers))
    off = np.asarray(run(lw.params, lw.buffers, qf.state, Switches(zeros, zeros), to_jax_tree((x,)), {}))
    with torch.no_grad():
        tq = m(x).numpy()
        with cal.quantization(False):
            tf = m(x).numpy()
    quant_error = np.abs(tq - tf).mean()
    assert quant_error > 1e-4
    assert np.abs(out - tq).mean() < 0.01 * quant_error
    np.testing.assert_allclose(off, tf, rtol=1e-5, atol=1e-5)  # switched off: W·s and x/s cancel


@pytest.mark.slow
def test_qdq_onnx_carries_the_division_along_the_channels(calib, tmp_path):
    pytest.importorskip("onnxruntime")
    from bridge.export.onnx import onnx_session

    m = PointwiseNet()
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    (path,) = cal.export_quant_onnx("net", tmp_path, input_names=["x"])
    y = onnx_session(path).run(None, {"x": calib[2].numpy()})[0]
    ref = _out(m, calib[2:3]).numpy()
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
