"""Weight scales per group of input columns (`QuantConfig.w_group_size`): calibration,
GPTQ, bias correction, export and reload, and the formats that refuse them."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import jaxq
from bridge import Calibrator
from bridge.export.files import ExportError
from bridge.export.reload import load_quantized
from bridge.jax_model.lower import LoweringError, to_jax_tree
from bridge.jax_model.mixed_precision import mixed_precision_front
from bridge.models.digits import load_digits_cnn
from jaxq.groupwise import columns, dequantize_codes

LINEAR = ("classifier.1", "classifier.3")  # in_features 256 and 48; the convolutions stay per channel


@pytest.fixture(scope="module")
def calib(digits):
    x_train = digits[0]
    return [x_train[i : i + 32] for i in range(0, 128, 32)]


def _cal(calib, group=16, w_bit=4, **kw):
    cfg = jaxq.QuantConfig(w_bit=w_bit, quantize_first_last=True, w_group_size=group, **kw)
    return Calibrator(load_digits_cnn(), cfg, calib, progress=False).run()


def _weight_error(cal) -> dict:
    out = {}
    for name in LINEAR:
        q = cal.quantizers[name]
        with torch.no_grad():
            w_hat = getattr(q.module, q.param).float()
        out[name] = float(((w_hat - q.float_weight.detach().float()) ** 2).mean())
    return out


def test_linear_layers_get_a_scale_per_group_and_simulate_it(calib):
    cal = _cal(calib, bias_correction=False)
    for name, q in cal.quantizers.items():
        rec = cal.records[name]
        w = q.float_weight.detach().float()
        if name in LINEAR:
            assert q.weight_group == 16 and rec.weight_scale.shape == (w.shape[0], w.shape[1] // 16)
            qp = jaxq.QParams(rec.weight_scale, rec.weight_offset, q.weight_scheme)
            expected = np.asarray(dequantize_codes(rec.codes, qp))
            # the codes are round to nearest on the group's grid (jaxq's numerics, torch's kernel)
            np.testing.assert_array_equal(
                rec.codes, np.asarray(jaxq.quantize(w.numpy(), columns(qp, w.shape[1]))).astype(rec.codes.dtype)
            )
        else:
            assert q.weight_group is None and rec.weight_scale.shape == (w.shape[0],)
            continue
        with torch.no_grad():
            w_hat = getattr(q.module, q.param).float().numpy()
        np.testing.assert_array_equal(w_hat, expected)
        groups_seen = {len(np.unique(rec.weight_scale[r])) for r in range(rec.weight_scale.shape[0])}
        assert max(groups_seen) > 1  # the groups of one row have scales of their own
    assert cal.layer_descriptions()["classifier.1"]["weight_group"] == 16


def test_groups_quantize_the_weights_closer_than_channels(calib):
    per_channel = _weight_error(_cal(calib, group=None))
    grouped = _weight_error(_cal(calib, group=16))
    for name in LINEAR:
        assert grouped[name] < 0.7 * per_channel[name], (name, grouped, per_channel)


def test_gptq_chooses_codes_on_the_group_grid(calib):
    rtn = _cal(calib)
    cal = _cal(calib, keep_acc={"gptq": True})
    report = cal.reports["gptq"]
    assert any(after < before for before, after in (report[n] for n in LINEAR))
    for name in LINEAR:
        rec, ref = cal.records[name], rtn.records[name]
        np.testing.assert_array_equal(rec.weight_scale, ref.weight_scale)  # GPTQ keeps the quantizer
        q = cal.quantizers[name]
        qp = jaxq.QParams(rec.weight_scale, rec.weight_offset, q.weight_scheme)
        with torch.no_grad():
            w_hat = getattr(q.module, q.param).float().numpy()
        np.testing.assert_array_equal(w_hat, np.asarray(dequantize_codes(rec.codes, qp)))
        assert rec.bias_correction is not None


def test_export_param_and_reload_keep_the_groups(calib, tmp_path):
    cal = _cal(calib, keep_acc={"gptq": True})
    cal.export_param(tmp_path)
    x = calib[0]
    with torch.no_grad():
        ref = cal.model(x)
    fresh = load_digits_cnn()
    load_quantized(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)
    other = Calibrator(load_digits_cnn(), cal.cfg, calib, progress=False).load_param(tmp_path)
    for name, rec in cal.records.items():
        np.testing.assert_array_equal(other.records[name].weight_scale, rec.weight_scale)
        np.testing.assert_array_equal(other.records[name].codes, rec.codes)


def test_per_channel_formats_and_the_jax_model_refuse_groups(calib, tmp_path):
    cal = _cal(calib, group=16, w_bit=8)  # 8-bit grids: the group scales are what they refuse
    with pytest.raises(ExportError, match=r"per output channel; 2 layer\(s\) have one per group of 16"):
        cal.export_quant_onnx("digits", tmp_path)
    with pytest.raises(ExportError, match=r"one per group of 16 input columns"):
        cal.export_quant_safetensor(tmp_path)
    with pytest.raises(ExportError, match=r"legacy .npy dicts holds one weight scale per output channel"):
        cal.export_param(tmp_path / "legacy", legacy=True)
    assert not (tmp_path / "legacy").exists()
    with pytest.raises(LoweringError, match=r"QuantizedModel .* one per group of 16 input columns"):
        cal.jax_model()
    with pytest.raises(LoweringError, match=r"mixed-precision front .* one per group of 16"):
        mixed_precision_front(cal.jax_forward(), calib[:1])


def _jax_out(cal, x) -> np.ndarray:
    qf = cal.jax_forward()
    lw = qf.lowered
    return np.asarray(jax.jit(qf.fn)(lw.params, lw.buffers, qf.state, qf.default_switches(), to_jax_tree((x,)), {}))


def _outputs(cal, x) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        quantized = cal.model(x).numpy()
        with cal.quantization(False):
            return quantized, cal.model(x).numpy()


def test_the_jax_model_simulates_weight_groups(calib):
    """The JAX model's `Ŵ` is the group grid's (`LayerQState` per element) — round to nearest
    and GPTQ's chosen codes: its output is torch's to well within the quantization error."""
    for keep_acc in (None, {"gptq": True}):
        cal = _cal(calib, group=16, keep_acc=keep_acc)
        assert keep_acc is None or any(cal.records[n].custom_codes for n in LINEAR)
        x = calib[1]
        quantized, fp = _outputs(cal, x)
        assert np.abs(_jax_out(cal, x) - quantized).mean() < 0.01 * np.abs(quantized - fp).mean()


def test_block_reconstruction_and_pd_quant_learn_on_weight_groups(calib):
    """QDrop's learned codes and `pd_quant`'s step sizes on layers with group scales: the
    records keep `[out, in/g]` scales, the codes dequantize on them to the weight torch
    computes with, and the JAX model still agrees with torch."""
    rtn = _cal(calib, group=16)
    cal = _cal(calib, group=16, keep_acc={"qdrop": [True, 30], "pd_quant": [True, 10]})
    assert cal.reports["blocks"] and cal.reports["pd_quant"]
    for name in LINEAR:
        rec, q = cal.records[name], cal.quantizers[name]
        assert rec.weight_scale.shape == (q.float_weight.shape[0], q.float_weight.shape[1] // 16)
        qp = jaxq.QParams(jnp.asarray(rec.weight_scale), jnp.asarray(rec.weight_offset), q.weight_scheme)
        with torch.no_grad():
            w_hat = getattr(q.module, q.param).float().numpy()
        np.testing.assert_array_equal(np.asarray(dequantize_codes(jnp.asarray(rec.codes), qp)), w_hat)
    assert any(cal.records[n].custom_codes for n in cal.records)  # some block kept learned codes
    x = calib[1]
    quantized, fp = _outputs(cal, x)
    assert np.abs(_jax_out(cal, x) - quantized).mean() < 0.01 * np.abs(quantized - fp).mean()
    before, _ = _outputs(rtn, torch.cat(calib))
    after, fp = _outputs(cal, torch.cat(calib))
    assert np.square(after - fp).mean() < np.square(before - fp).mean()


def test_a_group_size_that_does_not_divide_a_layer_names_it_and_leaves_the_model(calib):
    model = load_digits_cnn()
    before = copy.deepcopy(model.state_dict())
    cfg = jaxq.QuantConfig(w_bit=4, quantize_first_last=True, w_group_size=32)  # 48 % 32 ≠ 0
    with pytest.raises(
        ValueError, match=r"w_group_size=32 does not divide the 48 input columns of layer 'classifier.3'"
    ):
        Calibrator(model, cfg, calib, progress=False)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, nn.Module) and hasattr(m, "weight_scale") for m in model.modules())


def test_a_second_grouped_gptq_run_compiles_nothing(calib):
    _cal(calib, keep_acc={"gptq": True})
    with jaxq.compile_count() as c:
        _cal(calib, keep_acc={"gptq": True})
    assert c.count == 0


def test_adaround_learns_codes_on_the_group_grid(calib):
    rtn = _cal(calib)
    cal = _cal(calib, keep_acc={"adaround": [True, 200]})
    report = cal.reports["adaround"]
    assert all(after <= before for before, after in (report[n] for n in LINEAR))
    assert any(after < 0.9 * before for before, after in (report[n] for n in LINEAR))
    for name in LINEAR:
        rec = cal.records[name]
        np.testing.assert_array_equal(rec.weight_scale, rtn.records[name].weight_scale)
        assert rec.custom_codes
        q = cal.quantizers[name]
        qp = jaxq.QParams(rec.weight_scale, rec.weight_offset, q.weight_scheme)
        with torch.no_grad():
            w_hat = getattr(q.module, q.param).float().numpy()
        np.testing.assert_array_equal(w_hat, np.asarray(dequantize_codes(rec.codes, qp)))
