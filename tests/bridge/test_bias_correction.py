"""`bias_correction=True` through the Calibrator: the mean output it restores, float when
switched off, export and reload, fallback, layers without a bias."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

import jaxq
from bridge.output_check import FORWARDS
from bridge import Calibrator, load_quantized
from bridge.inplace.fakequant import model_quantizers
from bridge.models.digits import load_digits_cnn

# 4-bit weights: a visible shift; weight-only so the first layer sees the float input
W4 = jaxq.QuantConfig(
    w_bit=4, quant_mode=1, act_method=1, act_quant=False, quantize_first_last=True, bias_correction=False
)


def _first_layer_outputs(model, calib):
    seen = []
    layer = model.features[0]
    h = layer.register_forward_hook(lambda m, a, y: seen.append(y.detach().double()))
    with torch.no_grad():
        for x in calib:
            model(x)
    h.remove()
    return torch.cat(seen)


def test_first_layer_keeps_the_float_mean_output(digits_calib):
    plain = Calibrator(load_digits_cnn(), W4, digits_calib, progress=False).run()
    fixed = Calibrator(load_digits_cnn(), W4.replace(bias_correction=True), digits_calib, progress=False).run()
    plain.disable_quant()
    y_fp = _first_layer_outputs(plain.model, digits_calib)
    plain.enable_quant()
    # E[x] is the mean over every output position (bridge.capture.row_capture.row_sum), so the shift vanishes
    shift_before = (_first_layer_outputs(plain.model, digits_calib) - y_fp).mean((0, 2, 3))
    shift_after = (_first_layer_outputs(fixed.model, digits_calib) - y_fp).mean((0, 2, 3))
    assert shift_before.abs().max() > 1e-3
    assert shift_after.abs().max() < 1e-5
    assert set(fixed.reports["bias_correction"]) == set(fixed.quantized_names)


def test_switched_off_the_model_is_float_again(digits_calib, digits):
    x = digits[2][:64]
    plain = Calibrator(load_digits_cnn(), W4, digits_calib, progress=False).run()
    fixed = Calibrator(load_digits_cnn(), W4.replace(bias_correction=True), digits_calib, progress=False).run()
    with torch.no_grad():
        assert not torch.equal(fixed.model(x), plain.model(x))
        plain.disable_quant(), fixed.disable_quant()
        assert torch.equal(fixed.model(x), plain.model(x))


def test_improves_the_w4_model(digits_calib, digits):
    """Label-free W4A8 on the digits CNN: the corrected model is closer to float."""
    cfg = jaxq.QuantConfig(w_bit=4, quant_mode=1, act_method=1, quantize_first_last=True)
    x = digits[2]
    with torch.no_grad():
        ref = load_digits_cnn()(x)
        errs = [
            float(
                (
                    (
                        Calibrator(load_digits_cnn(), cfg.replace(bias_correction=bc), digits_calib, progress=False)
                        .run()
                        .model(x)
                        - ref
                    )
                    ** 2
                ).mean()
            )
            for bc in (False, True)
        ]
    assert errs[1] < errs[0]


def test_export_reload_is_bit_identical(digits_calib, digits, tmp_path):
    cal = Calibrator(load_digits_cnn(), W4.replace(bias_correction=True), digits_calib, progress=False).run()
    cal.export_param(tmp_path)
    tensors = load_file(str(tmp_path / "quant_params.safetensors"))
    for name, w in model_quantizers(cal.model).items():
        np.testing.assert_array_equal(tensors[f"{name}.bias_correction"], w.bias_correction.numpy())
    x = digits[2][:64]
    reloaded = load_quantized(load_digits_cnn(), tmp_path)
    again = Calibrator(load_digits_cnn(), W4.replace(bias_correction=True), digits_calib, progress=False)
    again.load_param(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(x), cal.model(x))
        assert torch.equal(again.model(x), cal.model(x))


class NoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8, bias=False)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_layer_without_bias_gets_one_and_fallback_removes_it():
    torch.manual_seed(0)
    model = NoBias().eval()
    data = [torch.randn(16, 6) + 1.0 for _ in range(2)]
    cfg = W4.replace(bias_correction=True, recon_rows=64)
    cal = Calibrator(model, cfg, data, progress=False).run()
    wrapper = model_quantizers(cal.model)["a"]
    assert wrapper.module.bias is not None and wrapper.float_bias is None
    torch.testing.assert_close(wrapper.corrected_bias(), wrapper.bias_correction)
    cal.fall_back(["a"])
    assert cal.model.a.bias is None and type(cal.model.a) is nn.Linear
    assert "a" not in cal.get_quant_params()[0] and "a" not in cal.params()["bias_correction"]
    with torch.no_grad():
        torch.testing.assert_close(cal.model.a(data[0]), cal.fp_model.a(data[0]), rtol=0, atol=0)


def test_second_run_compiles_nothing(digits_calib):
    cfg = W4.replace(bias_correction=True)
    Calibrator(load_digits_cnn(), cfg, digits_calib, progress=False).run()
    cal = Calibrator(load_digits_cnn(), cfg, digits_calib, progress=False)
    with jaxq.compile_count() as c:
        cal.run()
    assert c.count == 0


def test_config_rejects_non_bool():
    with pytest.raises(TypeError, match="bias_correction"):
        jaxq.QuantConfig(bias_correction="yes")


def test_default_is_on_with_calibration_data_and_off_data_free(digits_calib):
    assert jaxq.QuantConfig().bias_correction is None
    with_data = Calibrator(load_digits_cnn(), jaxq.QuantConfig(w_bit=4), digits_calib, progress=False)
    data_free = Calibrator(
        load_digits_cnn(), jaxq.QuantConfig(w_bit=4, quant_mode=0, input_shape=[1, 1, 8, 8]), None, progress=False
    )
    assert with_data.cfg.bias_correction is True and data_free.cfg.bias_correction is False
    explicit = Calibrator(
        load_digits_cnn(), jaxq.QuantConfig(w_bit=4, bias_correction=False), digits_calib, progress=False
    )
    assert explicit.cfg.bias_correction is False


def test_default_correction_lives_in_the_state_dict(digits_calib):
    cal = Calibrator(load_digits_cnn(), jaxq.QuantConfig(w_bit=4), digits_calib, progress=False).run()
    deltas = {k: v for k, v in cal.model.state_dict().items() if k.endswith("bias_correction")}
    assert deltas and any(float(v.abs().max()) > 0 for v in deltas.values())


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.inp(x)
        return self.mha(h, h, h)[0]


def test_default_is_skipped_with_a_warning_where_rows_cannot_be_sampled():
    from bridge.pipeline import BiasCorrectionSkipped

    torch.manual_seed(0)
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    cfg = jaxq.QuantConfig(quantize_first_last=True, recon_rows=32)
    with pytest.warns(BiasCorrectionSkipped, match="functional"):
        cal = Calibrator(_Attention().eval(), cfg, data, progress=False).run()
    skipped = [r for r in cal.steps if r.step == "bias_correction"]
    assert len(skipped) == 1 and "functional" in skipped[0].skipped
    assert "bias_correction" not in cal.reports and all(r.bias_correction is None for r in cal.records.values())
    with pytest.raises(Exception, match="functional"):  # asked for explicitly: an error, not a silent skip
        Calibrator(_Attention().eval(), cfg.replace(bias_correction=True), data, progress=False).run()


def _forwards_during_run(cfg, calib) -> tuple[int, Calibrator]:
    model = load_digits_cnn()
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    cal = Calibrator(model, cfg, calib, progress=False)
    before = len(calls)
    cal.run()
    handle.remove()
    return len(calls) - before, cal


def test_bias_correction_costs_no_forward_beyond_the_activation_pass(digits_calib):
    """Its mean rows are summed in the observers' forwards (W8A8, no row step) and equal the
    ones a separate float pass gives: the same δ, bit for bit."""
    from bridge.capture.context import Context
    from bridge.capture.rows import mean_rows_of

    cfg = jaxq.QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)
    plain, _ = _forwards_during_run(cfg.replace(bias_correction=False), digits_calib)
    fused, cal = _forwards_during_run(cfg.replace(bias_correction=True), digits_calib)
    assert fused == plain == len(digits_calib) + FORWARDS  # + the result check's (bridge.output_check)
    ctx = Context(cal.model, cal.quantizers, cal.specs, cal.cfg, digits_calib, torch.device("cpu"), progress=False)
    separate = mean_rows_of(ctx)  # one more float pass, quantization off
    assert set(separate) == set(cal.records)
    grouped, quantized = {}, {}
    for name, rec in cal.records.items():
        q = cal.quantizers[name]
        qp = jaxq.QParams(jnp.asarray(rec.weight_scale), jnp.asarray(rec.weight_offset), q.weight_scheme)
        w = jnp.asarray(q.float_weight.detach().float().numpy())
        grouped[name] = jaxq.rows.grouped_weight(cal.specs[name], w)
        quantized[name] = jaxq.QuantizedWeight(qp, jnp.asarray(rec.codes))
    expected = jaxq.accuracy.bias_corrections(separate, grouped, quantized)  # all layers: the run's packing
    for name, rec in cal.records.items():
        np.testing.assert_array_equal(np.asarray(expected[name], np.float32), rec.bias_correction)
