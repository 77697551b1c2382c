import copy

import numpy as np
import pytest
import torch
from torch import nn

import jaxq
from bridge import (
    CalibrationDataError,
    Calibrator,
    DeviceUnavailableError,
    EmptyModelError,
    LayerNameError,
    NonFiniteActivationError,
)
from bridge.models.digits import accuracy
from bridge.inplace.fakequant import model_quantizers
from jaxq import QuantConfig

LABEL_FREE = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


class PadThenConv(nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: an nn.Conv2d subclass that pads first."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.pad = nn.ZeroPad2d((1, 0, 1, 0))

    def forward(self, x):
        return nn.functional.conv2d(self.pad(x), self.weight, self.bias, self.stride, self.padding)


class KwargNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x, scale=None):
        h = torch.relu(self.a(x))
        return self.b(h if scale is None else h * scale)


def _kw_data(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 6, generator=g), "scale": torch.full((1,), 2.0)} for _ in range(n)]


def test_digits_label_free_w8a8_within_half_point(digits, digits_model):
    x_train, _, x_test, y_test = digits
    fp = accuracy(digits_model, x_test, y_test)
    calib = [x_train[i : i + 32] for i in range(0, 256, 32)]
    cal = Calibrator(digits_model, LABEL_FREE, calib, progress=False)
    cal.run()
    q = accuracy(cal.model, x_test, y_test)
    assert len(cal.quantized_names) == 5
    assert abs(q - fp) <= 0.005, (fp, q)
    assert accuracy(cal.fp_model, x_test, y_test) == fp


def test_fake_quant_changes_outputs_and_can_be_switched(digits_model, digits_calib):
    x = digits_calib[0]
    with torch.no_grad():
        fp = digits_model(x)
    cal = Calibrator(digits_model, LABEL_FREE, digits_calib, progress=False)
    with pytest.raises(RuntimeError, match="run"):
        cal.enable_quant()
    cal.run()
    with torch.no_grad():
        q = cal.model(x)
        cal.disable_quant()
        off = cal.model(x)
        cal.enable_quant()
        again = cal.model(x)
    assert not torch.equal(q, fp)
    torch.testing.assert_close(off, fp, rtol=1e-4, atol=1e-4)  # fused BN: float-equal up to rounding
    assert torch.equal(q, again)


def test_second_run_compiles_nothing(digits_calib):
    from bridge.models.digits import load_digits_cnn

    Calibrator(load_digits_cnn(), LABEL_FREE, digits_calib, progress=False).run()
    with jaxq.compile_count() as c:
        Calibrator(load_digits_cnn(), LABEL_FREE, digits_calib, progress=False).run()
    assert c.count == 0


def test_varying_batch_shapes_do_not_compile_per_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [torch.randn(n, 6) for n in (3, 5, 7, 9, 11, 13, 15)]  # all in one 1024 bucket
    cfg = LABEL_FREE.replace(minmax_combine="running")
    Calibrator(copy.deepcopy(model), cfg, data[:2], progress=False).run()
    with jaxq.compile_count() as c:
        Calibrator(copy.deepcopy(model), cfg, data, progress=False).run()
    assert c.count == 0


def test_quant_params_match_buffers_and_weights(digits_model, digits_calib):
    cal = Calibrator(digits_model, LABEL_FREE, digits_calib, progress=False).run()
    input_scale, input_offset, weight_scale, weight_offset, quant_weight = cal.get_quant_params()
    assert set(input_scale) == set(weight_scale) == set(quant_weight) == set(cal.quantized_names)
    layers = model_quantizers(cal.model)
    assert (
        set(layers)
        == set(cal.quantized_names)
        == {"features.0", "features.3", "features.7", "classifier.1", "classifier.3"}
    )
    for name, wrapper in layers.items():
        assert quant_weight[name].dtype == np.int8
        np.testing.assert_array_equal(wrapper.weight_scale.numpy(), weight_scale[name])
        assert float(wrapper.input_scale) == float(input_scale[name])
        s = weight_scale[name].reshape(-1, *[1] * (quant_weight[name].ndim - 1))
        deq = (quant_weight[name].astype(np.int32) - weight_offset[name].reshape(s.shape)).astype(np.float32) * s
        np.testing.assert_array_equal(deq, wrapper.fake_quant_weight().detach().numpy())
    # activation ranges: ReLU outputs give offset 0, the raw image in [0, 1] too
    assert all(int(o) == 0 for o in input_offset.values())


def test_subclass_forward_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(PadThenConv(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    cal = Calibrator(model, LABEL_FREE.replace(w_bit=8), [x], progress=False).run()
    with torch.no_grad():
        out = cal.model(x)
    assert isinstance(cal.model[0], PadThenConv) and model_quantizers(cal.model)["0"].module is cal.model[0]  # in place
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["dict", "tuple", "generator", "dataloader"])
def test_batch_forms(kind):
    torch.manual_seed(0)
    model = KwargNet()
    raw = _kw_data()
    if kind == "dict":
        data = raw
    elif kind == "tuple":
        data = [(b["x"], b["scale"]) for b in raw]
    elif kind == "generator":
        data = (b for b in raw)
    else:
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.cat([b["x"] for b in raw])), batch_size=4
        )
    cal = Calibrator(model, LABEL_FREE, data, progress=False).run()
    assert set(cal.get_quant_params()[0]) == {"a", "b"}


def test_default_disable_names_keep_first_and_last_float(digits_model, digits_calib):
    cal = Calibrator(digits_model, QuantConfig(quant_mode=1, act_method=1), digits_calib, progress=False).run()
    assert cal.disabled == {"features.0", "classifier.3"}
    assert cal.quantized_names == ["features.3", "features.7", "classifier.1"]
    assert isinstance(cal.model.features[0], nn.Conv2d) and isinstance(cal.model.classifier[3], nn.Linear)


def test_explicit_disable_names(digits_model, digits_calib):
    cfg = QuantConfig(quant_mode=1, act_method=1, disable_names=["features.3"])
    cal = Calibrator(digits_model, cfg, digits_calib, progress=False).run()
    assert "features.3" not in cal.quantized_names and "features.0" in cal.quantized_names


def test_weight_only(digits_model, digits_calib):
    cal = Calibrator(digits_model, LABEL_FREE.replace(act_quant=False), digits_calib, progress=False).run()
    input_scale, *_rest, quant_weight = cal.get_quant_params()
    assert input_scale == {} and len(quant_weight) == 5
    assert not hasattr(cal.model.features[0], "input_scale")


def test_data_free_uses_virtual_data_or_user_data(digits_model, digits_calib):
    cfg = QuantConfig(input_shape=[1, 1, 8, 8], quantize_first_last=True)  # act_method=0 sigma
    cal = Calibrator(copy.deepcopy(digits_model), cfg, progress=False).run()
    assert len(cal.calib_data) == 1 and cal.calib_data[0].shape == (1, 1, 8, 8)
    cal2 = Calibrator(digits_model, QuantConfig(quantize_first_last=True), digits_calib, progress=False).run()
    assert cal2.calib_data is digits_calib


def test_unused_model_is_not_touched_by_fp_copy(digits_model, digits_calib):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    cal = Calibrator(digits_model, LABEL_FREE, digits_calib, progress=False).run()
    for k, v in cal.fp_model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fuse_module_call_back_replaces_auto_fusion(digits_model, digits_calib):
    seen = []
    cal = Calibrator(
        digits_model, LABEL_FREE, digits_calib, fuse_module_call_back=lambda m: seen.append(m), progress=False
    )
    assert seen == [cal.model] and cal.fused == []
    assert isinstance(cal.model.features[1], nn.BatchNorm2d)


# --- bad input -------------------------------------------------------------------------


def test_unknown_disable_name_lists_nearest(digits_model, digits_calib):
    with pytest.raises(LayerNameError, match=r"features\.7x.*matches no quantizable layer.*nearest layer names") as e:
        Calibrator(digits_model, QuantConfig(quant_mode=1, disable_names=["features.7x"]), digits_calib)
    assert "features.7" in str(e.value)


def test_label_free_needs_calib_data(digits_model):
    with pytest.raises(CalibrationDataError, match="quant_mode=1"):
        Calibrator(digits_model, QuantConfig(quant_mode=1))


def test_data_free_needs_input_shape_or_data(digits_model):
    with pytest.raises(CalibrationDataError, match="input_shape"):
        Calibrator(digits_model, QuantConfig(quant_mode=0))


def test_bad_batch_type_names_the_batch(digits_model, digits_calib):
    with pytest.raises(CalibrationDataError, match="batch 2 has type str"):
        Calibrator(digits_model, LABEL_FREE, digits_calib[:2] + ["oops"], progress=False).run()


def test_batch_that_makes_model_raise_names_the_batch(digits_model, digits_calib):
    data = digits_calib[:3] + [torch.randn(2, 3, 8, 8)]
    cal = Calibrator(digits_model, LABEL_FREE, data, progress=False)
    with pytest.raises(CalibrationDataError, match=r"batch 3 \(input shapes \[\(2, 3, 8, 8\)\]\)"):
        cal.run()


def test_nan_activation_names_layer_and_batch():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    data = [torch.ones(2, 4), torch.ones(2, 4)]
    with torch.no_grad():
        model[0].weight[1, 0] = float("inf")
    cal = Calibrator(model, LABEL_FREE, [data[0], data[1].clone().fill_(-1)], progress=False)
    with pytest.raises(NonFiniteActivationError, match=r"layer '1'.*batch 0"):
        cal.run()


def test_empty_model():
    with pytest.raises(EmptyModelError, match="no quantizable layer"):
        Calibrator(nn.Sequential(nn.ReLU()), LABEL_FREE, [torch.ones(1)])


def test_npu_without_torch_npu_is_a_clear_error(digits_model, digits_calib):
    pytest.importorskip  # noqa: B018
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch_npu is installed here")
    with pytest.raises(DeviceUnavailableError, match="torch_npu"):
        Calibrator(digits_model, LABEL_FREE.replace(device="npu"), digits_calib)


def test_cuda_unavailable_is_a_clear_error(digits_model, digits_calib):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceUnavailableError, match="no CUDA device"):
        Calibrator(digits_model, LABEL_FREE.replace(device="cuda"), digits_calib)


def test_wrong_argument_types(digits_model):
    with pytest.raises(TypeError, match="QuantConfig"):
        Calibrator(digits_model, {"w_bit": 8})
    with pytest.raises(TypeError, match="nn.Module"):
        Calibrator("model", LABEL_FREE)
    with pytest.raises(CalibrationDataError, match="wrap it in a list"):
        Calibrator(digits_model, LABEL_FREE, torch.ones(1, 1, 8, 8))


# --- data-free -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 3, 8, 8], [1, 1, 2, 2]])
def test_input_shape_the_model_rejects_is_named(digits_model, shape):
    with pytest.raises(CalibrationDataError, match=r"QuantConfig.input_shape=\[.*\] was rejected by the model"):
        Calibrator(digits_model, QuantConfig(input_shape=shape))


def _bn_mismatch(model, x):
    from bridge.capture.synthetic import bn_loss_hooks

    losses = []
    handles = bn_loss_hooks(model, losses)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return float(sum(losses))


def test_bn_stats_virtual_data_matches_bn_statistics(digits_model):
    cfg = QuantConfig(input_shape=[16, 1, 8, 8], act_method=1, virtual_data="bn_stats", virtual_steps=60)
    cal = Calibrator(copy.deepcopy(digits_model), cfg, progress=False)
    distilled = cal.calib_data[0]
    uniform = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert _bn_mismatch(digits_model, distilled) < 0.3 * _bn_mismatch(digits_model, uniform)
    cal.run()  # and it calibrates


def test_bn_stats_needs_batchnorm():
    from bridge.capture.synthetic import SyntheticDataError

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(SyntheticDataError, match="BatchNorm"):
        Calibrator(model, QuantConfig(input_shape=[2, 4], virtual_data="bn_stats"))


def test_several_inputs_from_a_list_of_shapes():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(5, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    cal = Calibrator(
        TwoInputs(), QuantConfig(input_shape=[[2, 3], [2, 5]], quantize_first_last=True), progress=False
    ).run()
    assert set(cal.quantized_names) == {"a", "b"}
    assert [t.shape for t in cal.calib_data[0]] == [(2, 3), (2, 5)]


def test_state_dict_round_trip_restores_the_quantizer(digits_calib):
    from bridge.inplace.fakequant import model_quantizers
    from bridge.models.digits import load_digits_cnn

    cal = Calibrator(load_digits_cnn(), LABEL_FREE, digits_calib, progress=False).run()
    other = Calibrator(load_digits_cnn(), LABEL_FREE, digits_calib, progress=False)
    other.model.load_state_dict(cal.model.state_dict())
    for w in model_quantizers(other.model).values():
        w.quant_enabled = True
    x = digits_calib[0]
    with torch.no_grad():
        assert torch.equal(other.model(x), cal.model(x))


def test_disable_names_glob_patterns(digits_model, digits_calib):
    cfg = QuantConfig(quant_mode=1, act_method=1, disable_names=["features.*"])
    cal = Calibrator(digits_model, cfg, digits_calib, progress=False)
    assert cal.disabled == {"features.0", "features.3", "features.7"}
    cal.restore()
    with pytest.raises(LayerNameError, match=r"pattern 'blocks\.\*' matches no"):
        Calibrator(digits_model, QuantConfig(quant_mode=1, disable_names=["blocks.*"]), digits_calib)
