"""Reliability: a calibration is a transaction on the user's model."""

import copy

import pytest
import torch
from torch import nn

from bridge import Calibrator, QuantizedModelError
from bridge.inplace.fakequant import QuantizerConflictError, model_quantizers
from bridge.models.digits import load_digits_cnn
from jaxq import QuantConfig

W8A8 = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


def test_restore_gives_back_the_float_model(model_and_ref, digits_calib, assert_unchanged):
    model, x, ref, before = model_and_ref
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    assert cal.fused  # BNs were folded, quantizers attached
    with torch.no_grad():
        assert not torch.equal(model(x), ref)
    assert cal.restore() is model
    assert_unchanged(model, before, x, ref)
    with pytest.raises(RuntimeError, match="restored"):
        cal.get_quant_params()


def test_failed_run_leaves_the_model_as_it_was(model_and_ref, digits_calib, assert_unchanged):
    model, x, ref, before = model_and_ref
    bad = [b.clone() for b in digits_calib]
    bad[2][0, 0, 0, 0] = float("nan")
    cal = Calibrator(model, W8A8, bad, progress=False)
    with pytest.raises(FloatingPointError, match=r"layer 'features.0'.*batch 2"):
        cal.run()
    assert_unchanged(model, before, x, ref)


def test_failed_constructor_rolls_back_the_fusion(model_and_ref, digits_calib, snapshot, assert_unchanged):
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
    assert all(q.act_scheme.bits == 4 for q in model_quantizers(model).values())


def test_fp_model_is_lazy_and_bit_identical(model_and_ref, digits_calib):
    model, x, ref, before = model_and_ref
    import gc

    def copies() -> int:
        gc.collect()
        return sum(type(o) is type(model) for o in gc.get_objects())

    before_run = copies()
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    assert copies() == before_run  # no second copy until asked for
    fp = cal.fp_model
    assert copies() > before_run
    assert fp is not model and not model_quantizers(fp)
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


def test_one_layer_model_default_config_is_an_error():
    from bridge import EmptyModelError

    with pytest.raises(EmptyModelError, match="quantize_first_last"):
        Calibrator(nn.Sequential(nn.Linear(3, 3)), QuantConfig(quant_mode=1), [torch.randn(2, 3)], progress=False)


def test_fusion_never_pairs_a_bn_after_relu():
    """Conv → ReLU → BN: nothing may fold, however the allocator reuses tensor ids."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.BatchNorm2d(32),
        nn.Flatten(),
        nn.LazyLinear(2),
    ).eval()
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


def test_quantization_switch_and_summary(model_and_ref, digits_calib):
    model, x, ref, before = model_and_ref
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    with torch.no_grad():
        q = model(x)
        with cal.quantization(False):
            f = model(x)
        assert torch.equal(model(x), q) and not torch.equal(f, q)
    assert cal.summary().startswith("quantized layers 5 of 5")


def test_model_that_cannot_be_deep_copied_calibrates(digits_calib):
    import threading

    model = load_digits_cnn()
    model.lock = threading.Lock()  # no deep copy is taken unless fp_model is asked for
    cal = Calibrator(model, W8A8, digits_calib, progress=False).run()
    assert cal.records


def test_fuse_callback_must_fuse_in_place(digits_calib):
    model = load_digits_cnn()
    with pytest.raises(TypeError, match="in place"):
        Calibrator(model, W8A8, digits_calib, fuse_module_call_back=lambda m: 3, progress=False)
    assert not model_quantizers(model)


def test_sensitivity_compares_call_with_call():
    """A module called three times: the table's MSE is over the k-th quantized call against the k-th float call."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)

    class Thrice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = shared, nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.a(torch.tanh(self.a(torch.tanh(self.a(x))))))

    model = Thrice().eval()
    data = [torch.randn(8, 6) for _ in range(2)]
    cal = Calibrator(model, W8A8, data, progress=False).run()
    outs = {False: [], True: []}
    for on in (False, True):
        h = cal.model.a.register_forward_hook(lambda m, a, o, on=on: outs[on].append(o.detach().clone()))
        with torch.no_grad(), cal.quantization(on):
            cal.model(data[0])
        h.remove()
    expected = sum(float(((f - q) ** 2).sum()) for f, q in zip(outs[False], outs[True])) / sum(
        f.numel() for f in outs[False]
    )
    row = next(r for r in cal.sensitivity(metrics=("mse",), samples=8).rows if r["name"] == "a")
    assert row["mse"] == pytest.approx(expected, rel=1e-4)
