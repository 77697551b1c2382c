import numpy as np
import torch

import jaxq
from bridge import Calibrator
from bridge.studies import sensitivity as sens
from bridge.jax_model.robustness import calibration_robustness


def test_robustness_equals_calibrating_and_scoring_each_subset_in_torch():
    from bridge.evaluation import protocols

    p = protocols.digits()
    cfg = jaxq.QuantConfig(w_bit=4, a_bit=8, act_method=1, quantize_first_last=True)
    eval_batches = [p.calib_data[-1]]
    calib = p.calib_data[:-1]
    calibrate = lambda b: Calibrator(p.make_model(), cfg, b, progress=False).run().calibrated()  # noqa: E731
    report = calibration_robustness(calibrate, calib, eval_batches, k=3, fraction=0.4, seed=1)
    assert len(report.distances) == 3 and report.worst >= report.mean >= 0 and report.std >= 0
    assert len({tuple(s) for s in report.subsets}) > 1
    for subset, d in zip(report.subsets, report.distances):
        cal = Calibrator(p.make_model(), cfg, [calib[i] for i in subset], progress=False).run()
        with torch.no_grad():
            q = cal.model(eval_batches[0])
            with cal.quantization(False):
                f = cal.model(eval_batches[0])
        np.testing.assert_allclose(d, sens.output_distance(f, q), rtol=0.05, atol=1e-6)
    assert "calibration subsets" in str(report)


def test_calibrate_must_return_a_calibrated_model():
    import pytest

    from bridge.evaluation import protocols

    p = protocols.digits()
    cfg = jaxq.QuantConfig(act_method=1, quantize_first_last=True)
    with pytest.raises(TypeError, match="Calibrated"):
        calibration_robustness(
            lambda b: Calibrator(p.make_model(), cfg, b, progress=False).run(), p.calib_data[:2], p.calib_data[-1:], k=2
        )
