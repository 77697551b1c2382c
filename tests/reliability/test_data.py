"""Reliability: calibration data — empty, one-shot, NaN, and layers it never reaches."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bridge import Calibrator
from bridge.capture.context import UncalibratedLayerError
from jaxq import QuantConfig

W8A8 = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


def test_nan_data_weight_only_bias_correction_is_caught(model_and_ref, digits_calib, assert_unchanged):
    model, x, ref, before = model_and_ref
    bad = [b.clone() for b in digits_calib]
    bad[1][0, 0, 0, 0] = float("nan")
    cfg = QuantConfig(quant_mode=1, act_quant=False, bias_correction=True)
    with pytest.raises(FloatingPointError, match="NaN"):
        Calibrator(model, cfg, bad, progress=False).run()
    assert_unchanged(model, before, x, ref)


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
