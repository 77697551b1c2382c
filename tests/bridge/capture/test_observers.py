"""`bridge.capture.observers`: the warning for negative inputs on an unsigned symmetric grid."""

import warnings

import pytest
import torch
from torch import nn

import jaxq
from bridge import Calibrator
from bridge.capture.observers import ClippedNegativeInputsWarning


class AfterRelu(nn.Module):
    """`a` reads the (signed) input, `b` reads a ReLU's output: only `a`'s negatives are lost."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


CALIB = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _run(**fields):
    cfg = jaxq.QuantConfig(quantize_first_last=True, act_method=1, bias_correction=False, **fields)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Calibrator(AfterRelu(), cfg, CALIB, progress=False).run()
    return [w for w in caught if issubclass(w.category, ClippedNegativeInputsWarning)]


def test_an_unsigned_symmetric_grid_names_the_layers_whose_negatives_it_clips():
    (w,) = _run(a_sym=True, a_signed=False)
    message = str(w.message)
    assert "1 of 2 layers" in message and "'a'" in message and "'b'" not in message
    assert "a_sym=False" in message and "a_signed=True" in message


@pytest.mark.parametrize("fields", [dict(a_sym=False), dict(a_sym=True, a_signed=True)])
def test_grids_that_hold_negatives_say_nothing(fields):
    assert _run(**fields) == []
