"""Per-layer weight bit widths (`QuantConfig.layer_bits`): calibration, exports, reload."""

import numpy as np
import pytest
import torch

import jaxq
from bridge import Calibrator
from bridge.export.files import ExportError
from bridge.models.digits import load_digits_cnn
from bridge.export.reload import load_quantized


def _cal(digits_calib_batches, **kw):
    cfg = jaxq.QuantConfig(
        w_bit=8, a_bit=8, quantize_first_last=True, layer_bits={"features.3": 4, "classifier.*": 6}, **kw
    )
    return Calibrator(load_digits_cnn(), cfg, digits_calib_batches, progress=False).run()


@pytest.fixture(scope="module")
def calib(digits):
    x_train = digits[0]
    return [x_train[i : i + 32] for i in range(0, 128, 32)]


def test_each_layer_gets_its_grid(calib):
    cal = _cal(calib)
    layers = cal.quantizers
    bits = {n: q.weight_scheme.bits for n, q in layers.items()}
    assert bits["features.3"] == 4 and bits["classifier.1"] == bits["classifier.3"] == 6 and bits["features.0"] == 8
    for name, rec in cal.records.items():
        b = bits[name]
        assert rec.codes.min() >= -(2 ** (b - 1)) and rec.codes.max() <= 2 ** (b - 1) - 1
        assert rec.codes.max() == 2 ** (b - 1) - 1 or rec.codes.min() == -(2 ** (b - 1))  # the grid is used in full
    desc = cal.layer_descriptions()
    assert desc["features.3"]["weight_scheme"]["bits"] == 4


def test_export_and_reload_keep_the_widths(calib, tmp_path):
    cal = _cal(calib)
    cal.export_param(tmp_path)
    x = calib[0]
    with torch.no_grad():
        ref = cal.model(x)
    fresh = load_digits_cnn()
    load_quantized(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)
    other = Calibrator(load_digits_cnn(), cal.cfg, calib, progress=False)
    other.load_param(tmp_path)
    for name, rec in cal.records.items():
        np.testing.assert_array_equal(other.records[name].codes, rec.codes)


def test_eight_bit_only_exports_refuse_other_widths(calib, tmp_path):
    cal = _cal(calib)
    with pytest.raises(ExportError, match="layer_bits gives .* other widths .*'features.3': 4"):
        cal.export_quant_safetensor(tmp_path)


@pytest.mark.parametrize("bad, error", [({"conv1": 9}, ValueError), ({3: 4}, TypeError), ("conv1", TypeError)])
def test_bad_layer_bits_name_the_entry(bad, error):
    with pytest.raises(error, match="layer_bits"):
        jaxq.QuantConfig(layer_bits=bad)


# -- per-layer input widths and the academic first/last convention -----------------------------
ENDS = ("features.0", "classifier.3")


def _params(cal):
    return {n: (r.weight_scale, r.codes, r.input_scale, r.input_offset) for n, r in cal.records.items()}


def test_first_and_last_at_8bit_equal_an_8bit_run_of_those_layers(calib, tmp_path):
    """`quantize_first_last="8bit"`: the first and last layer's weights and inputs on the 8-bit
    grid — the very parameters of a W8A8 run for them (each layer's own statistics), 4 bits
    elsewhere; `cal.cfg` names them."""
    cfg = jaxq.QuantConfig(w_bit=4, a_bit=4, act_method=2, quantize_first_last="8bit")
    cal = Calibrator(load_digits_cnn(), cfg, calib, progress=False).run()
    eight = Calibrator(
        load_digits_cnn(), cfg.replace(w_bit=8, a_bit=8, quantize_first_last=True), calib, progress=False
    ).run()
    assert cal.disabled == set()
    assert cal.cfg.layer_bits == tuple((n, 8) for n in ENDS) == cal.cfg.layer_act_bits
    for name, q in cal.quantizers.items():
        bits = 8 if name in ENDS else 4
        assert (q.weight_scheme.bits, q.act_scheme.bits) == (bits, bits), name
        assert cal.layer_descriptions()[name]["act_scheme"]["bits"] == bits
    for name in ENDS:
        for a, b in zip(_params(cal)[name], _params(eight)[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
    codes = cal.records["features.3"].codes
    assert codes.max() <= 7 and codes.min() >= -8
    assert Calibrator(load_digits_cnn(), cal.cfg, calib, progress=False).cfg == cal.cfg  # resolved once
    cal.export_param(tmp_path)
    fresh = load_digits_cnn()
    load_quantized(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(calib[0]), cal.model(calib[0]), rtol=0, atol=0)


def test_layer_act_bits_export_reload_and_refuse_eight_bit_formats(calib, tmp_path):
    cfg = jaxq.QuantConfig(w_bit=8, a_bit=8, quantize_first_last=True, layer_act_bits={"features.3": 4})
    cal = Calibrator(load_digits_cnn(), cfg, calib, progress=False).run()
    assert cal.quantizers["features.3"].act_scheme.bits == 4 and cal.quantizers["features.7"].act_scheme.bits == 8
    cal.export_param(tmp_path / "p")
    fresh = load_digits_cnn()
    load_quantized(fresh, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(fresh(calib[0]), cal.model(calib[0]), rtol=0, atol=0)
    with pytest.raises(ExportError, match="8-bit input codes; layer_act_bits gives 1 layer.*'features.3': 4"):
        cal.export_quant_safetensor(tmp_path / "w8a8")


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(layer_act_bits={"conv1": 9}), ValueError, "layer_act_bits"),
        (dict(layer_act_bits={3: 4}), TypeError, "layer_act_bits"),
        (dict(quantize_first_last="academic"), (TypeError, ValueError), "quantize_first_last"),
    ],
)
def test_bad_act_widths_and_conventions_name_the_field(kw, error, match):
    with pytest.raises(error, match=match):
        jaxq.QuantConfig(**kw)


def test_a_layer_act_bits_pattern_matching_nothing_names_the_nearest(calib):
    from bridge.inplace.modules import LayerNameError

    with pytest.raises(LayerNameError, match="layer_act_bits"):
        Calibrator(load_digits_cnn(), jaxq.QuantConfig(layer_act_bits={"feature.3": 4}), calib, progress=False)


def test_four_bit_layers_get_mse_ranges_and_wider_layers_min_max(calib):
    by_default, minmax = _cal(calib), _cal(calib, w_range="minmax")
    for name, rec in by_default.records.items():
        ref = minmax.records[name]
        if by_default.quantizers[name].weight_scheme.bits > 4:
            np.testing.assert_array_equal(rec.weight_scale, ref.weight_scale)
            np.testing.assert_array_equal(rec.codes, ref.codes)
        else:
            assert np.all(rec.weight_scale <= ref.weight_scale) and np.any(rec.weight_scale < ref.weight_scale)
            w = by_default.quantizers[name].float_weight.detach().numpy().reshape(len(rec.codes), -1)

            def error(r):
                return np.sum((r.codes.reshape(len(w), -1) * r.weight_scale.reshape(-1, 1) - w) ** 2)

            assert error(rec) < error(ref)  # symmetric grid: ŵ = q·s
