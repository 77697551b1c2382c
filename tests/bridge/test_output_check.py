"""The check at the end of `run()`: the quantized output against the float output."""

import math

import pytest
import torch
from torch import nn

from bridge import Calibrator
from bridge.output_check import QuantizedOutputWarning, check_output
from bridge.inplace.fakequant import model_quantizers
from bridge.capture.data import Batch
from jaxq import QuantConfig

CFG = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True)


class Cancelling(nn.Module):
    """`x − a(x)` with `a` nearly the identity: the float output is `10⁻⁴·x`, the quantized
    one is dominated by the input's rounding error `x − Q(x)`, which does not follow `x`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        with torch.no_grad():
            self.a.weight.copy_((1 - 1e-4) * torch.eye(16))
            self.a.bias.zero_()

    def forward(self, x):
        return x - self.a(x)


def test_a_quantized_output_far_from_the_float_one_is_reported():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 16, generator=g) for _ in range(2)]
    with pytest.warns(QuantizedOutputWarning, match=r"cosine -?0\.\d+ against the float model"):
        cal = Calibrator(Cancelling(), CFG, data, progress=False).run()
    assert cal.output_cosine < 0.5
    assert f"{cal.output_cosine:.4f}" in cal.summary()


def test_a_working_model_passes_silently_and_the_cosine_is_kept(recwarn):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cal = Calibrator(model, CFG, [torch.randn(8, 16) for _ in range(2)], progress=False).run()
    assert cal.output_cosine > 0.99
    assert not [w for w in recwarn if issubclass(w.category, QuantizedOutputWarning)]


def test_the_cosine_is_that_of_the_first_sample_with_quantization_on_and_off():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    cal = Calibrator(model, CFG, [x], progress=False).run()
    with torch.no_grad():
        quantized = cal.model(x[:1]).double().reshape(-1)
        cal.disable_quant()
        reference = cal.model(x[:1]).double().reshape(-1)
        cal.enable_quant()
    expected = float(quantized @ reference / (quantized.norm() * reference.norm()))
    assert cal.output_cosine == pytest.approx(expected, rel=1e-12)


def test_non_finite_quantized_outputs_are_reported():
    cal = Calibrator(nn.Sequential(nn.Linear(4, 4)), CFG, [torch.randn(4, 4)], progress=False).run()
    with torch.no_grad():
        cal.model[0].bias_correction.fill_(float("nan"))  # δ applies with quantization on only
    batch = Batch((torch.randn(2, 4),), {})
    with pytest.warns(QuantizedOutputWarning, match="non-finite values"):
        assert math.isnan(check_output(cal.model, model_quantizers(cal.model), batch))


def test_a_model_that_rejects_the_cut_batch_is_checked_on_the_whole_batch():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 2)

        def forward(self, x):
            assert x.shape[0] == 8, "this model only takes batches of 8"
            return self.head(torch.relu(self.fc(x)))

    cal = Calibrator(FixedBatch(), CFG, [torch.randn(8, 16)], progress=False).run()
    assert cal.output_cosine > 0.99
