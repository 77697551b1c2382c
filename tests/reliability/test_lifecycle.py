"""Reliability: a calibration is a transaction on the user's model."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from bridge import Calibrator, QuantizedModelError
from bridge.calibration import UncalibratedLayerError
from bridge.fakequant import QuantizerConflictError, wrappers
from bridge.models.digits import load_digits_cnn
from jaxq import QuantConfig

W8A8 = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()],
            [id(p) for p in model.parameters()])


def assert_unchanged(model, before, x, ref):
    state, types, params = before
    now = model.state_dict()
    assert list(now) == list(state)
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert [id(p) for p in model.parameters()] == params
    assert not wrappers(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.fixture
def model_and_ref(digits_calib):
    model = load_digits_cnn()
    x = digits_calib[0]
    with torch.no_grad():
        ref = model(x)
    return model, x, ref, snapshot(model)


def test_restore_gives_back_the_float_model(model_and_ref, digits_calib):
    model, x, ref, before = model_and_ref
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    assert cal.fused  # BNs were folded, quantizers attached
    with torch.no_grad():
        assert not torch.equal(model(x), ref)
    assert cal.restore() is model
    assert_unchanged(model, before, x, ref)
    with pytest.raises(RuntimeError, match="restored"):
        cal.get_quant_params()


def test_failed_run_leaves_the_model_as_it_was(model_and_ref, digits_calib):
    model, x, ref, before = model_and_ref
    bad = [b.clone() for b in digits_calib]
    bad[2][0, 0, 0, 0] = float("nan")
    cal = Calibrator(model, W8A8, bad, progress=False)
    with pytest.raises(FloatingPointError, match=r"layer 'features.0'.*batch 2"):
        cal.run()
    assert_unchanged(model, before, x, ref)


def test_nan_data_weight_only_bias_correction_is_caught(model_and_ref, digits_calib):
    model, x, ref, before = model_and_ref
    bad = [b.clone() for b in digits_calib]
    bad[1][0, 0, 0, 0] = float("nan")
    cfg = QuantConfig(quant_mode=1, act_quant=False, bias_correction=True)
    with pytest.raises(FloatingPointError, match="NaN"):
        Calibrator(model, cfg, bad, progress=False).run()
    assert_unchanged(model, before, x, ref)


def test_failed_constructor_rolls_back_the_fusion(model_and_ref, digits_calib):
    model, x, ref, before = model_and_ref
    model.classifier[3].weight_scale = 1.0  # a name clash found only after the BNs were folded
    before = snapshot(model)
    with pytest.raises(QuantizerConflictError, match=r"'classifier.3'.*weight_scale"):
        Calibrator(model, W8A8, digits_calib, progress=False)
    assert_unchanged(model, before, x, ref)


def test_quantized_model_is_refused_then_recalibrated_cleanly(model_and_ref, digits_calib):
    model, x, ref, before = model_and_ref
    cal8 = Calibrator(model, W8A8, digits_calib, progress=False).run()
    with pytest.raises(QuantizedModelError, match="restore"):
        Calibrator(model, W8A8.replace(a_bit=4), digits_calib, progress=False)
    cal8.restore()
    cal4 = Calibrator(model, W8A8.replace(a_bit=4), digits_calib, progress=False).run()
    fresh = Calibrator(load_digits_cnn(), W8A8.replace(a_bit=4), digits_calib, progress=False).run()
    with torch.no_grad():
        assert torch.equal(cal4.model(x), fresh.model(x))
    assert all(q.act_scheme.bits == 4 for q in wrappers(model).values())


def test_fp_model_is_lazy_and_bit_identical(model_and_ref, digits_calib):
    model, x, ref, before = model_and_ref
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    assert cal._fp_model is None  # no second copy until asked for
    fp = cal.fp_model
    assert fp is not model and not wrappers(fp)
    assert [type(m) for m in fp.modules()] == [t for _, t in before[1]]
    with torch.no_grad():
        assert torch.equal(fp(x), ref)
        q = model(x)
    with torch.no_grad():  # building the copy left the quantized model as it was
        assert torch.equal(model(x), q)


def test_train_mode_comes_back(digits_calib):
    model = load_digits_cnn().train()
    cal = Calibrator(model, W8A8, digits_calib, progress=False)
    assert not model.training
    cal.restore()
    assert model.training and all(m.training for m in model.modules())


def test_layer_never_reached_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.rare, self.b = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            if x.shape[0] == 3:
                h = self.rare(h)
            return self.b(h)

    model = Branchy().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UncalibratedLayerError, match=r"'rare'.*disable_names"):
        Calibrator(model, W8A8, [torch.randn(8, 4)] * 3, progress=False).run()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    cal = Calibrator(model, W8A8.replace(disable_names=["rare"]), [torch.randn(8, 4)] * 3, progress=False).run()
    with torch.no_grad():
        assert torch.isfinite(cal.model(torch.randn(3, 4))).all()


def test_one_layer_model_default_config_is_an_error():
    from bridge import EmptyModelError

    with pytest.raises(EmptyModelError, match="quantize_first_last"):
        Calibrator(nn.Sequential(nn.Linear(3, 3)), QuantConfig(quant_mode=1), [torch.randn(2, 3)], progress=False)


def test_empty_calib_data_is_a_clear_error():
    from bridge import CalibrationDataError

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    for empty in ((), [], torch.utils.data.DataLoader([], batch_size=1)):
        with pytest.raises(CalibrationDataError, match="calib_data"):
            Calibrator(model, W8A8, empty, progress=False)


def test_one_shot_iterable_keeps_its_first_batch():
    torch.manual_seed(0)
    batches = [torch.randn(4, 3) * (i + 1) for i in range(3)]

    class OneShot:
        def __init__(self):
            self.it = iter(batches)

        def __iter__(self):
            return self.it

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    a = Calibrator(copy.deepcopy(model), W8A8, OneShot(), progress=False).run()
    b = Calibrator(copy.deepcopy(model), W8A8, batches, progress=False).run()
    for k in range(4):
        for n in a.get_quant_params()[k]:
            np.testing.assert_array_equal(a.get_quant_params()[k][n], b.get_quant_params()[k][n])


def test_fusion_never_pairs_a_bn_after_relu():
    """Conv → ReLU → BN: nothing may fold, however the allocator reuses tensor ids."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.BatchNorm2d(32), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = torch.randn(2, 1, 9, 9)
    with torch.no_grad():
        model(x)
    for _ in range(20):
        cal = Calibrator(copy.deepcopy(model), W8A8, [x], progress=False)
        assert cal.fused == []


def test_sensitivity_arguments_are_checked(digits_calib):
    cal = Calibrator(load_digits_cnn(), W8A8, digits_calib, progress=False).run()
    with pytest.raises(TypeError, match="string"):
        cal.sensitivity(metrics="mse")
    with pytest.raises(ValueError, match="samples"):
        cal.sensitivity(samples=0)
    curve = cal.fallback_search(target=-1.0, max_layers=0, samples=8)
    assert curve.order == [] and cal.fallen_back == []
