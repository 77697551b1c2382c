"""Reliability: misuse after (or around) calibration gets one clear message naming what to change."""

import threading

import pytest
import torch
from torch import nn

from bridge import Calibrator, LayerNameError
from bridge.models.digits import load_digits_cnn
from jaxq import QuantConfig

W8A8 = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


@pytest.fixture
def cal(digits_calib):
    return Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()


@pytest.mark.parametrize("cast", ["half", "double"])
def test_half_and_double_after_run_compute(cal, digits_calib, cast):
    x = digits_calib[0]
    with torch.no_grad():
        expected = cal.model(x)
        out = getattr(cal.model, cast)()(getattr(x, cast)())
    assert out.dtype == getattr(torch, "float16" if cast == "half" else "float64")
    tolerance = 0.02 if cast == "half" else 1e-5
    assert float((out.float() - expected).abs().max()) <= tolerance * float(expected.abs().max())


def test_torchscript_is_refused_naming_the_layer(cal):
    with pytest.raises(TypeError, match=r"jit.script.*'features.0'.*export"):
        torch.jit.script(cal.model)


def test_inference_mode_is_refused_up_front(digits_calib):
    model = load_digits_cnn()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        Calibrator(model, W8A8, digits_calib, progress=False)
    cal = Calibrator(model, W8A8, digits_calib, progress=False)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        cal.run()


def test_quantization_switch_takes_a_bool(cal):
    with pytest.raises(TypeError, match="True or False"):
        with cal.quantization("no"):
            pass


def test_accuracy_control_with_a_nan_score_says_so(cal):
    with pytest.raises(ValueError, match="returned nan on the float model"):
        cal.quantize_with_accuracy_control(lambda m: float("nan"), 0.01)


def test_diverging_virtual_data_names_virtual_lr():
    from bridge.capture.synthetic import SyntheticDataError

    cfg = QuantConfig(
        quant_mode=0, virtual_data="bn_stats", virtual_lr=1e30, virtual_steps=20, input_shape=[1, 1, 8, 8]
    )
    with pytest.raises(SyntheticDataError, match="virtual_lr"):
        Calibrator(load_digits_cnn(), cfg, progress=False).run()


def test_uncopyable_model_names_fp_model():
    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lock, self.a, self.b = threading.Lock(), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x))

    cal = Calibrator(Locked().eval(), W8A8, [torch.randn(4, 4)], progress=False).run()
    with pytest.raises(TypeError, match="fp_model is a deep copy.*Locked"):
        cal.fp_model


def test_layer_bits_pattern_matching_nothing_names_the_nearest(digits_calib):
    with pytest.raises(LayerNameError, match=r"layer_bits.*'feature.0'.*features.0"):
        Calibrator(load_digits_cnn(), W8A8.replace(layer_bits={"feature.0": 4}), digits_calib, progress=False)


def test_unwritable_compilation_cache_warns_once(tmp_path):
    from bridge import jit_cache

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    import os

    if os.access(ro, os.W_OK):
        pytest.skip("root ignores directory permissions")
    try:
        with pytest.warns(UserWarning, match="not writable"):
            assert jit_cache.enable(ro) is None
    finally:
        ro.chmod(0o700)


def test_keyword_called_layers_calibrate_with_rows():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(input=torch.relu(self.a(input=x)))

    cal = Calibrator(
        Keyword().eval(), W8A8.replace(bias_correction=True), [torch.randn(8, 4)] * 2, progress=False
    ).run()
    assert set(cal.quantized_names) == {"a", "b"} and cal.records["b"].bias_correction is not None


def test_quantization_off_equals_fp_model_with_a_padding_mask():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True), nn.Linear(16, 3)

        def forward(self, x, mask):
            return self.head(self.enc(x, src_key_padding_mask=mask))

    x = torch.randn(4, 6, 16)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 4:] = True
    cal = Calibrator(M().eval(), W8A8.replace(bias_correction=False), [(x, mask)], progress=False).run()
    with torch.no_grad():
        with cal.quantization(False):
            assert torch.equal(cal.model(x, mask), cal.fp_model(x, mask))
        q = cal.model(x, mask)
    # the comparison measures quantization, not torch's zeros at padded positions
    table = cal.sensitivity(metrics=("mse",))
    head = next(r for r in table.rows if r["name"] == "head")
    with torch.no_grad(), cal.quantization(False):
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            f = cal.model(x, mask)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert head["mse"] == pytest.approx(float(((q - f) ** 2).mean()), rel=1e-3)
