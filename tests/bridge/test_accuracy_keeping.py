"""keep_acc through the Calibrator on the digits CNN: every algorithm runs, the simulated
weights are the exported codes, and reloads reproduce them."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import jaxq
from bridge import Calibrator, load_quantized
from bridge.inplace.fakequant import model_quantizers
from bridge.models.digits import accuracy
from bridge.capture.row_capture import LayerGeometryError

W4 = jaxq.QuantConfig(w_bit=4, quant_mode=1, act_method=1, quantize_first_last=True, recon_rows=256)


def _run(model, calib, **keep_acc):
    return Calibrator(model, W4.replace(keep_acc=keep_acc), calib, progress=False).run()


def _weight_error(cal):
    total = 0.0
    for w in model_quantizers(cal.model).values():
        total += float(torch.sum((w.fake_quant_weight() - w.float_weight).detach() ** 2))
    return total


def _simulated_codes_are_exported(cal):
    codes = cal.get_quant_params()[4]
    for name, w in model_quantizers(cal.model).items():
        deq = (
            torch.from_numpy(codes[name].astype(np.float32))
            - w.weight_offset.reshape(-1, *[1] * (w.float_weight.dim() - 1))
        ) * w.weight_scale.reshape(-1, *[1] * (w.float_weight.dim() - 1))
        torch.testing.assert_close(w.fake_quant_weight().detach(), deq, rtol=0, atol=0)


@pytest.fixture
def rtn(digits_model, digits_calib):
    return Calibrator(digits_model, W4, digits_calib, progress=False).run()


def test_admm_lowers_weight_error(rtn, digits_calib):
    from bridge.models.digits import load_digits_cnn

    minmax = W4.replace(w_range="minmax")  # msModelSlim's start: ADMM's alternation improves on it
    rtn_minmax = Calibrator(load_digits_cnn(), minmax, digits_calib, progress=False).run()
    admm_minmax = Calibrator(
        load_digits_cnn(), minmax.replace(keep_acc={"admm": [True, 200]}), digits_calib, progress=False
    ).run()
    assert _weight_error(admm_minmax) < 0.95 * _weight_error(rtn_minmax)
    cal = _run(load_digits_cnn(), digits_calib, admm=[True, 200])  # from the default 4-bit start, the search
    assert _weight_error(cal) <= _weight_error(rtn) < _weight_error(admm_minmax)
    _simulated_codes_are_exported(cal)
    assert not any(w.weight_codes is not None for w in model_quantizers(cal.model).values())


@pytest.mark.parametrize(
    "keep_acc",
    [
        dict(round_opt=True),
        dict(adaround=[True, 200]),
        dict(admm=[True, 50], round_opt=True),
        dict(gptq={"block_size": 32}),
    ],
    ids=["squant", "adaround", "admm+squant", "gptq"],
)
def test_rounding_algorithms_simulate_and_export_their_codes(digits_calib, digits, keep_acc, tmp_path):
    from bridge.models.digits import load_digits_cnn

    cal = _run(load_digits_cnn(), digits_calib, **keep_acc)
    assert any(w.weight_codes is not None for w in model_quantizers(cal.model).values())
    _simulated_codes_are_exported(cal)
    x_test = digits[2][:64]
    with torch.no_grad():
        expected = cal.model(x_test)
    cal.export_param(tmp_path / "p")
    reloaded = load_quantized(load_digits_cnn(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x_test), expected, rtol=0, atol=0)
    again = Calibrator(load_digits_cnn(), W4.replace(keep_acc=keep_acc), digits_calib, progress=False).load_param(
        tmp_path / "p"
    )
    with torch.no_grad():
        torch.testing.assert_close(again.model(x_test), expected, rtol=0, atol=0)


def test_gptq_reduces_every_layer_output_error_and_bias_correction_follows_it(digits_model, digits_calib):
    cal = _run(digits_model, digits_calib, gptq=True)
    report = cal.reports["gptq"]
    assert set(report) == set(cal.quantized_names)
    assert all(after <= before for before, after in report.values())
    assert sum(a for _, a in report.values()) < 0.5 * sum(b for b, _ in report.values())
    assert [s.step for s in cal.steps][-2:] == ["gptq", "bias_correction"]
    assert all(r.bias_correction is not None for r in cal.records.values())  # δ of GPTQ's codes, not of nearest


def test_adaround_reduces_every_layer_output_error(digits_model, digits_calib):
    cal = _run(digits_model, digits_calib, adaround=[True, 300])
    report = cal.reports["adaround"]
    assert set(report) == set(cal.quantized_names)
    assert all(after <= before for before, after in report.values())
    assert sum(a for _, a in report.values()) < 0.8 * sum(b for b, _ in report.values())


@pytest.mark.slow
def test_easy_quant_raises_layer_cosine_and_keeps_accuracy(digits_model, digits_calib, digits):
    cal = _run(digits_model, digits_calib, easy_quant=[True, 32])
    report = cal.reports["easy_quant"]
    assert all(after >= before for before, after in report.values())
    assert any(after > before for before, after in report.values())
    assert accuracy(cal.model, digits[2], digits[3]) >= 0.98


@pytest.mark.slow
def test_weight_only_easy_quant(digits_model, digits_calib):
    cal = Calibrator(
        digits_model, W4.replace(act_quant=False, keep_acc={"easy_quant": [True, 8]}), digits_calib, progress=False
    ).run()
    assert all(after >= before for before, after in cal.reports["easy_quant"].values())


def test_easy_quant_keeps_only_the_rows_it_reads_and_gives_the_same_result(digits_calib, monkeypatch):
    """The runner keeps the first `ROWS_USED` sampled rows for EasyQuant (`jaxq.pipeline.rows_read`):
    the very parameters of keeping all `recon_rows`, in less memory."""
    import jaxq.pipeline
    from bridge.models.digits import load_digits_cnn
    from jaxq.accuracy import LAYER_STEPS
    from jaxq.easyquant import ROWS_USED

    cfg = W4.replace(recon_rows=2048, keep_acc={"easy_quant": [True, 8]})
    seen = []

    def easy_quant(float_weights, layers, settings, progress):
        seen.append({n: r.rows.shape[0] for n, r in layers.layers.items()})
        return step(float_weights, layers, settings, progress)

    step = LAYER_STEPS["easy_quant"]
    monkeypatch.setitem(LAYER_STEPS, "easy_quant", easy_quant)
    kept = Calibrator(load_digits_cnn(), cfg, digits_calib, progress=False).run().get_quant_params()
    monkeypatch.setattr(jaxq.pipeline, "ROWS_READ", {})
    every = Calibrator(load_digits_cnn(), cfg, digits_calib, progress=False).run().get_quant_params()
    assert max(seen[0].values()) == ROWS_USED and max(seen[1].values()) > ROWS_USED
    for a, b in zip(kept, every):
        for n in a:
            np.testing.assert_array_equal(a[n], b[n])


class DynamicPadConv(nn.Conv2d):
    """Pads at run time (like timm's Conv2dSame): its LayerSpec cannot describe it."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


def test_a_layer_its_spec_does_not_describe_is_named():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), DynamicPadConv(4, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(3)
    )
    data = [torch.randn(4, 1, 12, 12) for _ in range(2)]
    model(data[0])
    fresh = copy.deepcopy(model)
    cfg = W4.replace(keep_acc={"adaround": [True, 10]})
    with pytest.raises(LayerGeometryError, match=r"'2'.*DynamicPadConv.*disable_names"):
        Calibrator(model, cfg, data, progress=False).run()
    cal = Calibrator(fresh, cfg.replace(disable_names=["2"]), data, progress=False).run()
    assert "2" not in cal.quantized_names


def test_second_run_compiles_nothing(digits_model, digits_calib):
    cfg = W4.replace(keep_acc={"admm": [True, 20], "easy_quant": [True, 8], "round_opt": True, "adaround": [True, 20]})
    from bridge.models.digits import load_digits_cnn

    Calibrator(digits_model, cfg, digits_calib, progress=False).run()
    cal = Calibrator(load_digits_cnn(), cfg, digits_calib, progress=False)
    with jaxq.compile_count() as again:
        cal.run()
    assert again.count == 0


@pytest.mark.slow
def test_adaround_on_65536_wide_rows_completes_and_never_loses_to_nearest():
    """A conv whose rows are 65,536 wide: Ĥ would be a 16 GiB matrix; its row factor is not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 4096, 1), nn.ReLU(), nn.Conv2d(4096, 8, 4), nn.Flatten(), nn.Linear(8, 2)
    ).eval()
    data = [torch.randn(16, 16, 4, 4) for _ in range(4)]
    cfg = jaxq.QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, keep_acc={"adaround": [True, 50]})
    cal = Calibrator(model, cfg, data, progress=False).run()
    assert cal.params()["quant_weight"]["2"].shape == (8, 4096, 4, 4)
    assert all(after <= before for before, after in cal.reports["adaround"].values())


@pytest.mark.slow
def test_memory_budget_groups_layers_without_changing_the_result(digits_calib):
    """Rows sampled group by group (several passes) give the very same parameters as one pass."""
    from bridge.models.digits import load_digits_cnn

    cfg = W4.replace(recon_rows=2048, keep_acc={"easy_quant": [True, 8], "adaround": [True, 20]})
    small = Calibrator(load_digits_cnn(), cfg.replace(memory_budget=16), digits_calib, progress=False)
    big = Calibrator(load_digits_cnn(), cfg.replace(memory_budget=4096), digits_calib, progress=False)
    passes = {}
    for name, cal in (("small", small), ("big", big)):
        counted = []
        cal.model.register_forward_pre_hook(lambda *a, c=counted: c.append(1))
        cal.run()
        passes[name] = len(counted)
    assert passes["small"] > passes["big"]  # more passes over the data: the rows were split into groups
    for a, b in zip(small.get_quant_params(), big.get_quant_params()):
        for n in a:
            np.testing.assert_array_equal(a[n], b[n])


def test_a_layer_too_wide_for_the_budget_samples_fewer_rows():
    from bridge.capture.memory import ReducedRowsWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1 << 16, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    data = [torch.randn(64, 1 << 16) for _ in range(2)]
    cfg = jaxq.QuantConfig(
        quant_mode=1, act_method=1, quantize_first_last=True, memory_budget=16, keep_acc={"adaround": [True, 10]}
    )
    with pytest.warns(ReducedRowsWarning, match="'0'|0 \\("):
        Calibrator(model, cfg, data, progress=False).run()
