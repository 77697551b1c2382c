import pytest

import jaxq
from bridge import Calibrator
from bridge.studies.accuracy_control import accuracy_control
from bridge.evaluation import protocols


@pytest.fixture(scope="module")
def digits_w2():
    p = protocols.digits(held_out=200)
    cfg = jaxq.QuantConfig(w_bit=2, a_bit=4, w_range="minmax")  # the searched range loses only 1.5 points here
    cal = Calibrator(p.make_model(), cfg, p.calib_data, progress=False).run()
    return cal, p


def test_fewest_layers_meeting_the_drop_and_the_report(digits_w2):
    cal, p = digits_w2
    calls = []

    def top1(model):
        calls.append(1)
        return p.evaluate(model)["top1"]

    quantized = top1(cal.model)
    reference = p.reference["top1"]
    assert reference - quantized > 0.02  # W2A4 hurts: there is something to control
    report = accuracy_control(
        cal.model, cal.quantizers, top1, 0.01, cal.sensitivity(metrics=("isolated",)).ranked("isolated")
    )
    assert report.chosen >= 1 and report.drop(report.chosen) <= 0.01
    assert report.chosen - 1 in report.scores and report.drop(report.chosen - 1) > 0.01  # one fewer misses
    assert abs(report.reference - reference) < 1e-9
    assert all(q.quant_enabled for q in cal.quantizers.values())  # switches restored
    assert "← chosen" in str(report)


def test_calibrator_falls_back_the_chosen_layers(digits_w2):
    p = protocols.digits(held_out=200)
    cal = Calibrator(p.make_model(), jaxq.QuantConfig(w_bit=2, a_bit=4), p.calib_data, progress=False).run()
    report = cal.quantize_with_accuracy_control(lambda m: p.evaluate(m)["top1"], max_drop=0.01)
    assert len(cal.fallen_back) == report.chosen >= 1
    assert p.reference["top1"] - p.evaluate(cal.model)["top1"] <= 0.01


def test_bad_arguments_are_named(digits_w2):
    cal, _ = digits_w2
    with pytest.raises(ValueError, match="max_drop=-1"):
        accuracy_control(cal.model, cal.quantizers, lambda m: 1.0, -1, [])
    with pytest.raises(TypeError, match="must return a number"):
        accuracy_control(cal.model, cal.quantizers, lambda m: "high", 0.1, [])
    with pytest.raises(TypeError, match="validate must be callable"):
        cal.quantize_with_accuracy_control("top1", 0.01)
