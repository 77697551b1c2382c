"""Reliability: QuantConfig refuses what would fail later, naming the field."""

import numpy as np
import pytest
import torch
from torch import nn

from bridge import Calibrator
from jaxq import QuantConfig


def test_numpy_scalars_become_python_values(tmp_path):
    cfg = QuantConfig(
        w_bit=np.int64(8),
        sigma=np.float32(20.0),
        act_quant=np.bool_(True),
        quant_mode=1,
        act_method=1,
        quantize_first_last=True,
    )
    assert type(cfg.w_bit) is int and type(cfg.sigma) is float and type(cfg.act_quant) is bool
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    cal = Calibrator(model, cfg, [torch.randn(4, 3)], progress=False).run()
    cal.export_param(tmp_path)  # JSON-serialisable


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("seed", 2**70, "seed"),
        ("seed", -1, "seed"),
        ("virtual_lr", float("inf"), "virtual_lr"),
        ("sigma", float("inf"), "sigma"),
        ("device", "cpu\n", "device"),
        ("device", " cpu", "device"),
        ("keep_acc", {"admm": [True, 10**12]}, "admm"),
        ("keep_acc", {"adaround": [True, 10**9]}, "adaround"),
        ("virtual_steps", 10**9, "virtual_steps"),
    ],
)
def test_values_that_would_fail_later_are_refused(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuantConfig(**{field: value})


@pytest.mark.parametrize("bins", [16, 32, 63])
def test_small_histograms_calibrate(bins):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    cfg = QuantConfig(quant_mode=1, act_method=2, hist_bins=bins, quantize_first_last=True)
    cal = Calibrator(model, cfg, [torch.randn(8, 3) for _ in range(2)], progress=False).run()
    assert all(np.isfinite(v).all() and (v > 0).all() for v in cal.get_quant_params()[0].values())
