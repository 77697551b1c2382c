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
