"""`QuantConfig(smooth_quant=…)` through the Calibrator: shared factors for layers reading
one tensor, the arithmetic of a smoothed layer, float when off, restore, export and
reload, the JAX model, and the exports that cannot carry the factors."""

import numpy as np
import pytest
import torch
from torch import nn

import jaxq
from bridge import Calibrator, ExportError, load_quantized
from bridge.inplace.fakequant import model_quantizers
from tests.bridge.layer_io import seen_io

D = 32


class OutlierBlock(nn.Module):
    """A LayerNorm with one outlier channel feeding q/k/v, then an MLP and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(D)
        with torch.no_grad():
            self.ln.weight[3] = 40.0
            self.ln.weight[17] = -25.0
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 64), nn.Linear(64, D)
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        h = self.ln(x)
        y = x + self.q(h) * torch.sigmoid(self.k(h)) + self.v(h)
        return self.head(self.fc2(torch.relu(self.fc1(y))) + y)


CFG = jaxq.QuantConfig(
    quant_mode=1, act_method=1, minmax_combine="running", quantize_first_last=True, bias_correction=False
)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 10, D, generator=g) for _ in range(4)]


def _out(model, batches):
    with torch.no_grad():
        return torch.cat([model(x) for x in batches])


def test_layers_reading_one_tensor_share_their_factors(calib):
    cal = Calibrator(OutlierBlock(), CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    groups = {tuple(r["layers"]) for r in cal.reports["smooth_quant"].values()}
    assert ("q", "k", "v") in groups and ("fc1",) in groups and ("fc2",) in groups
    s = {n: cal.records[n].smoothing for n in "qkv"}
    np.testing.assert_array_equal(s["q"], s["k"])
    np.testing.assert_array_equal(s["q"], s["v"])
    assert s["q"][3] > 3 * np.median(s["q"])  # the outlier channel is divided down


def test_smoothing_brings_the_quantized_model_closer_to_float(calib):
    fp = _out(OutlierBlock(), calib)
    err = {}
    for sq in (None, 0.5, True):
        m = OutlierBlock()
        Calibrator(m, CFG.replace(smooth_quant=sq), calib, progress=False).run()
        err[sq] = float((_out(m, calib) - fp).pow(2).mean())
    assert err[0.5] < 0.5 * err[None]
    assert err[True] < 0.5 * err[None]


def test_a_smoothed_layer_computes_fq_of_x_over_s_times_fq_of_w_times_s(calib):
    """`y = Q(x / s)·Q(W·diag(s))ᵀ + b` with torch's own fake-quantize ops, bit for bit."""
    m = OutlierBlock()
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    rec = cal.records["fc1"]
    seen = seen_io(m.fc1, m, calib[0])
    with torch.no_grad():
        s = torch.from_numpy(rec.smoothing)
        a = cal.cfg.act_scheme
        xq = torch.fake_quantize_per_tensor_affine(
            seen["x"] / s, float(rec.input_scale), int(rec.input_offset), a.qmin, a.qmax
        )
        w = m.fc1.parametrizations.weight.original * s
        wq = torch.fake_quantize_per_channel_affine(
            w, torch.tensor(rec.weight_scale), torch.tensor(rec.weight_offset), 0, -128, 127
        )
        expected = torch.nn.functional.linear(xq, wq, m.fc1.bias)
    torch.testing.assert_close(seen["y"], expected, rtol=0, atol=0)


def test_quantization_off_is_the_float_model_and_restore_leaves_no_trace(calib):
    m = OutlierBlock()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fp = _out(OutlierBlock(), calib)
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    with cal.quantization(False):
        assert torch.equal(_out(m, calib), fp)
    cal.restore()
    assert not model_quantizers(m)
    after = m.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_out(m, calib), fp)


def test_a_second_run_measures_the_unsmoothed_input_again(calib):
    cal = Calibrator(OutlierBlock(), CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    first = {n: r.smoothing.copy() for n, r in cal.records.items()}
    cal.run()
    for n, s in first.items():
        np.testing.assert_array_equal(cal.records[n].smoothing, s)


def test_export_and_reload_rebuild_the_smoothed_model(calib, tmp_path):
    m = OutlierBlock()
    cal = Calibrator(m, CFG.replace(smooth_quant=True), calib, progress=False).run()
    cal.export_param(tmp_path / "p")
    params = cal.params()
    assert set(params["smooth_scale"]) == {n for n, r in cal.records.items() if r.smoothing is not None}
    reloaded = load_quantized(OutlierBlock(), tmp_path / "p")
    assert torch.equal(_out(reloaded, calib), _out(m, calib))
    again = Calibrator(OutlierBlock(), CFG.replace(smooth_quant=True), calib, progress=False).load_param(tmp_path / "p")
    assert torch.equal(_out(again.model, calib), _out(m, calib))


def test_reload_refuses_bad_factors(calib, tmp_path):
    from safetensors.numpy import load_file, save_file

    from bridge.export.files import SAFETENSORS_NAME

    cal = Calibrator(OutlierBlock(), CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    cal.export_param(tmp_path)
    tensors = load_file(str(tmp_path / SAFETENSORS_NAME))
    tensors["fc1.smooth_scale"] = -tensors["fc1.smooth_scale"]
    save_file(tensors, str(tmp_path / SAFETENSORS_NAME), metadata={"format": "jaxq"})
    with pytest.raises(ValueError, match="'fc1': smooth_scale must be 32 finite positive values"):
        _reload_unverified(tmp_path)


def _reload_unverified(path):
    """The manifest guards the files; rewrite it so the value check itself is reached."""
    import json

    from bridge.export.files import MANIFEST_NAME, sha256

    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["files"] = {n: sha256(path / n) for n in manifest["files"]}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return load_quantized(OutlierBlock(), path)


def test_formats_without_a_place_for_the_factors_refuse(calib, tmp_path):
    cal = Calibrator(OutlierBlock(), CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    with pytest.raises(ExportError, match="SmoothQuant"):
        cal.export_quant_safetensor(tmp_path)
    with pytest.raises(ExportError, match="SmoothQuant"):
        cal.export_quant_onnx("m", tmp_path, ascend=True)


@pytest.mark.slow
def test_qdq_onnx_carries_the_division(calib, tmp_path):
    pytest.importorskip("onnxruntime")
    from bridge.export.onnx import onnx_session

    m = OutlierBlock()
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    (path,) = cal.export_quant_onnx("block", tmp_path, input_names=["x"])
    y = onnx_session(path).run(None, {"x": calib[2].numpy()})[0]
    ref = _out(m, calib[2:3]).numpy()
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


def test_bias_correction_of_a_smoothed_layer_uses_its_smoothed_input(calib):
    """`δ = (W·diag(s) − Ŵ)·E[x / s]`: the rows the corrections read are those the quantizer reads."""
    m = OutlierBlock()
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5, bias_correction=True), calib, progress=False).run()
    rec = cal.records["fc1"]
    seen = []
    m.fc1.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().reshape(-1, D)), prepend=True)
    with cal.quantization(False):
        _out(m, calib)  # the float model's inputs, as the pass that gathered E[x] saw them
    x = torch.cat(seen).double()
    s = torch.from_numpy(rec.smoothing).double()
    w = m.fc1.parametrizations.weight.original.detach().double() * s
    w_hat = (torch.tensor(rec.codes).double() - torch.tensor(rec.weight_offset).double()[:, None]) * torch.tensor(
        rec.weight_scale
    ).double()[:, None]
    expected = (w - w_hat) @ (x / s).mean(0)
    np.testing.assert_allclose(rec.bias_correction, expected.numpy(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("keep_acc", [{"gptq": True}, {"adaround": [True, 20]}])
def test_rows_of_the_quantized_model_keep_the_smoothing(calib, keep_acc):
    """`recon_inputs="quantized"` writes interim records to sample the quantized model's rows:
    they must carry the factors, or the layers lose them and the codes of `W·diag(s)` are
    applied to `W` (the model's output turned to noise)."""
    fp = _out(OutlierBlock(), calib)
    err, factors = {}, {}
    for inputs in ("float", "quantized"):
        m = OutlierBlock()
        cfg = CFG.replace(w_bit=4, smooth_quant=0.5, keep_acc=keep_acc, recon_inputs=inputs)
        cal = Calibrator(m, cfg, calib, progress=False).run()
        factors[inputs] = {n: r.smoothing for n, r in cal.records.items()}
        assert all(q.smoothing is not None for n, q in model_quantizers(m).items() if n != "head")
        err[inputs] = float((_out(m, calib) - fp).pow(2).mean() / fp.pow(2).mean())
    for n, s in factors["float"].items():
        np.testing.assert_array_equal(factors["quantized"][n], s)
    assert err["quantized"] < 2 * err["float"] + 1e-3, err


def test_smoothing_with_weight_groups_quantizes_w_times_s_per_group_and_reloads(calib, tmp_path):
    """`y = Q(x / s)·Ŵᵀ + b` with `Ŵ = Q_g(W·diag(s))`, the weight quantized per group of 16
    columns after smoothing: round to nearest is torch's per-channel kernel over the groups,
    bit for bit; GPTQ's codes dequantize on the same group grid; export and reload keep both."""
    for keep_acc in (None, {"gptq": True}):
        m = OutlierBlock()
        cfg = CFG.replace(smooth_quant=0.5, w_bit=4, w_sym=False, w_group_size=16, keep_acc=keep_acc)
        cal = Calibrator(m, cfg, calib, progress=False).run()
        rec = cal.records["fc1"]
        assert rec.smoothing is not None and rec.weight_scale.shape == (64, D // 16)
        seen = seen_io(m.fc1, m, calib[0])
        with torch.no_grad():
            s = torch.from_numpy(rec.smoothing)
            a, w_scheme = cal.cfg.act_scheme, cal.quantizers["fc1"].weight_scheme
            xq = torch.fake_quantize_per_tensor_affine(
                seen["x"] / s, float(rec.input_scale), int(rec.input_offset), a.qmin, a.qmax
            )
            group_scale = torch.tensor(rec.weight_scale).reshape(-1)
            group_offset = torch.tensor(rec.weight_offset).reshape(-1).int()
            if keep_acc is None:
                rows = (m.fc1.parametrizations.weight.original * s).reshape(-1, 16)
                wq = torch.fake_quantize_per_channel_affine(
                    rows, group_scale, group_offset, 0, w_scheme.qmin, w_scheme.qmax
                ).reshape(64, D)
            else:
                codes = torch.tensor(rec.codes).float().reshape(-1, 16)
                wq = ((codes - group_offset[:, None]) * group_scale[:, None]).reshape(64, D)
            expected = torch.nn.functional.linear(xq, wq, m.fc1.bias)
        torch.testing.assert_close(seen["y"], expected, rtol=0, atol=0)
        cal.export_param(tmp_path / str(keep_acc is None))
        assert torch.equal(
            _out(load_quantized(OutlierBlock(), tmp_path / str(keep_acc is None)), calib), _out(m, calib)
        )
