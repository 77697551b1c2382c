import math

import pytest
import torch
from torch import nn

from bridge import Calibrator, LayerQuantizer
from bridge.capture.data import Batch
from bridge.inplace.fakequant import model_quantizers, probing
from bridge.inplace.functional import one_attention_path
from bridge.models.digits import accuracy, load_digits_cnn
from bridge.studies import sensitivity as sens
from jaxq import QuantConfig

LOW_BIT = dict(quant_mode=1, act_method=1, quantize_first_last=True, w_bit=2, a_bit=4)


@pytest.fixture
def calibrated(digits_calib):
    return Calibrator(load_digits_cnn(), QuantConfig(**LOW_BIT), digits_calib, progress=False).run()


def test_table_has_every_layer_and_prints(calibrated):
    table = calibrated.sensitivity(samples=32)
    assert [r["name"] for r in table.rows] == calibrated.quantized_names
    assert set(table.rows[0]) == {"name", "kind", "weight_shape", "mse", "relative_mse", "isolated", "quantized"}
    text = str(table)
    assert "features.0" in text and "relative_mse" in text
    # isolated: quantizing only the classifier's last layer matters little next to the input conv at 2 bits
    iso = {r["name"]: r["isolated"] for r in table.rows}
    assert iso["features.0"] > iso["classifier.1"]


@pytest.mark.parametrize("metric", ["mse", "relative_mse", "isolated", "fisher"])
def test_amp_num_falls_back_the_top_ranked_layers_to_float(digits_calib, metric):
    ranking = (
        Calibrator(load_digits_cnn(), QuantConfig(**LOW_BIT), digits_calib, progress=False)
        .run()
        .sensitivity(metrics=(metric,))
        .ranked(metric)
    )
    cal = Calibrator(
        load_digits_cnn(), QuantConfig(**LOW_BIT, amp_num=2, amp_metric=metric), digits_calib, progress=False
    ).run()
    assert cal.fallen_back == ranking[:2]
    float_model = load_digits_cnn()
    for name in cal.fallen_back:
        module = cal.model.get_submodule(name)
        assert not isinstance(module, LayerQuantizer) and not hasattr(module, "parametrizations")
        original = float_model.get_submodule(name)
        if name.startswith("classifier"):  # not BN-folded: the very float weights
            assert torch.equal(module.weight, original.weight)
    assert set(cal.get_quant_params()[2]) == set(cal.quantized_names)
    assert len(cal.quantized_names) == 3
    with pytest.raises(ValueError, match="not a quantized layer"):
        cal.fall_back([cal.fallen_back[0]])


def test_fallback_search_reaches_target_with_fewest_layers(calibrated, digits):
    curve = calibrated.fallback_search(target=0.05, samples=32)
    assert curve.points[0] > 0.05 and curve.points[curve.chosen] <= 0.05
    assert all(p > 0.05 for p in curve.points[: curve.chosen])
    assert calibrated.fallen_back == curve.order[: curve.chosen]
    assert curve.points[-1] == 0.0  # everything float again
    assert "target reached" in str(curve)
    _, _, x_test, y_test = digits
    assert accuracy(calibrated.model, x_test, y_test) > 0.9


def test_sensitivity_lists_float_layers_and_rejects_unknown_metrics(digits_calib):
    cal = Calibrator(load_digits_cnn(), QuantConfig(quant_mode=1, act_method=1), digits_calib, progress=False).run()
    rows = {r["name"]: r for r in cal.sensitivity(metrics=("mse",)).rows}
    assert rows["features.0"]["quantized"] is False and math.isnan(rows["features.0"]["mse"])
    assert rows["features.0"]["kind"] == "conv2d" and rows["classifier.1"]["kind"] == "linear"
    with pytest.raises(ValueError, match="not known"):
        cal.sensitivity(metrics=("psnr",))


def test_transformer_outputs_use_cosine_distance():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return (self.b(torch.relu(self.a(x))),)  # a tuple of [batch, seq, dim]

    torch.manual_seed(0)
    data = [torch.randn(2, 5, 8) for _ in range(3)]
    cal = Calibrator(
        Tiny(), QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, w_bit=2), data, progress=False
    ).run()
    curve = cal.fallback_search(target=1e-6)  # float32 cosine of equal outputs is ~5e-8 from 1
    assert curve.metric == "1 - cosine" and curve.chosen == 2


def test_second_run_keeps_the_fallback(digits_calib):
    cal = Calibrator(load_digits_cnn(), QuantConfig(**LOW_BIT, amp_num=1), digits_calib, progress=False).run()
    first = list(cal.fallen_back)
    cal.run()
    assert cal.fallen_back == first and len(cal.quantized_names) == 4


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    return model, [torch.randn(256, 16) * 2 for _ in range(2)]


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    return layer, [torch.randn(32, 6, 16) for _ in range(8)]  # functional layers: one ε per batch


@pytest.mark.parametrize("make", [_mlp, _encoder], ids=["logits", "attention"])
def test_fisher_estimates_the_isolated_distance_of_every_layer(make):
    """½·E[(c·Δz)²] is the isolated distance to second order: with many draws the estimate
    of every layer (module outputs, and attention's functional projections) is close."""
    model, data = make()
    cfg = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, w_bit=6)
    cal = Calibrator(model, cfg, data, progress=False).run()
    layers = model_quantizers(cal.model)
    assert any(q.functional for q in layers.values()) == (make is _encoder)
    isolated = {r["name"]: r["isolated"] for r in cal.sensitivity(metrics=("isolated",), samples=512).rows}
    with one_attention_path():  # as the isolated forwards: no fused fast path
        fisher = sens.fisher_sensitivity(cal.model, layers, cal.calibration_batches(512), draws=16)
    for name in layers:
        assert isolated[name] > 0
        assert fisher[name] == pytest.approx(isolated[name], rel=0.3), name


def test_probing_at_zero_is_the_float_model_and_leaves_no_trace():
    model, data = _encoder()
    cal = Calibrator(model, QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True), data, progress=False)
    cal.run()
    layers = model_quantizers(cal.model)
    hooks = {n: len(q.module._forward_hooks) for n, q in layers.items()}
    with torch.no_grad(), one_attention_path():
        cal.disable_quant()
        expected = cal.model(data[0])
        cal.enable_quant()
        eps = torch.zeros(len(layers), 32, requires_grad=True)
        with probing(layers, eps):
            assert torch.equal(cal.model(data[0]), expected)
    assert all(q.quant_enabled and q.probe is None for q in layers.values())
    assert {n: len(q.module._forward_hooks) for n, q in layers.items()} == hooks
    with pytest.raises(ValueError, match="eps of shape"):
        with probing(layers, torch.zeros(len(layers))):
            pass


def test_fisher_refuses_a_forward_without_gradients():
    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            with torch.no_grad():
                return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    data = [torch.randn(4, 8) for _ in range(2)]
    cfg = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, amp_num=1)
    model = NoGrad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="amp_metric='isolated'"):
        Calibrator(model, cfg, data, progress=False).run()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_amp_batches_take_exactly_the_first_samples():
    x = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    batches = [Batch((x,), {}), Batch((x + 100,), {}), Batch((x + 200,), {})]
    got = sens.amp_batches(batches, 10)
    assert [sens.batch_rows(b) for b in got] == [8, 2]
    assert torch.equal(got[1].args[0], (x + 100)[:2])
    keyword = Batch((), {"input_ids": x.long(), "attention_mask": torch.ones(8, 3)})
    cut = sens.amp_batches([keyword], 3)[0]
    assert cut.kwargs["input_ids"].shape == (3, 3) and cut.kwargs["attention_mask"].shape == (3, 3)


@pytest.mark.parametrize(
    "batch",
    [
        Batch((torch.zeros(8, 3), torch.zeros(5)), {}),  # an input whose first axis is not the rows
        Batch((torch.zeros(8, 3),), {"scale": 2.0}),  # a non-tensor input
        Batch(((torch.zeros(8, 3), torch.zeros(8, 3)),), {}),  # a nested input
    ],
)
def test_amp_batches_keep_a_batch_whole_where_rows_cannot_be_cut(batch):
    (got,) = sens.amp_batches([batch], 2)
    assert got is batch


def test_calibration_batches_hold_amp_samples(digits_calib):
    cal = Calibrator(load_digits_cnn(), QuantConfig(amp_samples=40), digits_calib, progress=False)
    assert [sens.batch_rows(b) for b in cal.calibration_batches()] == [32, 8]
