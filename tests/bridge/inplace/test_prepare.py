"""The structure probes of preparation run on a cut of the first batch."""

import torch
from torch import nn

import jaxq
from bridge.output_check import FORWARDS, SAMPLES
from bridge import Calibrator
from bridge.capture.data import Batch
from bridge.inplace.prepare import PROBE_SAMPLES, probe_batch


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.sizes = []

    def forward(self, x, scale=None, other=None):
        self.sizes.append(x.shape[0])
        y = self.bn(self.conv(x)).mean((2, 3))
        return self.fc(y if scale is None else y * scale[:, None])


def test_probes_read_two_samples_and_calibration_every_sample():
    torch.manual_seed(0)
    model = _Recorder().eval()
    data = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    cal = Calibrator(model, jaxq.QuantConfig(quantize_first_last=True), data, progress=False)
    # one forward reads the structure (outputs, Conv+BN pairs, functional calls), one checks the fusion
    assert model.sizes == [PROBE_SAMPLES, PROBE_SAMPLES]
    assert cal.fused  # the Conv+BN pair was found on the cut batch
    model.sizes.clear()
    cal.run()
    assert model.sizes == [16, 16, 16] + [SAMPLES] * FORWARDS  # + the result check (bridge.output_check)


def test_every_tensor_of_the_batch_size_is_cut_together():
    model = _Recorder().eval()
    batch = Batch((torch.randn(8, 3, 8, 8),), {"scale": torch.randn(8), "other": torch.randn(3)})
    small = probe_batch(model, batch)
    assert small.args[0].shape[0] == PROBE_SAMPLES and small.kwargs["scale"].shape == (PROBE_SAMPLES,)
    assert small.kwargs["other"].shape == (3,)  # not the batch's leading size: left whole


class _FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.reshape(6, 12))  # the batch size written into the model


def test_a_model_that_rejects_the_cut_batch_is_probed_on_the_whole_one():
    model = _FixedBatch().eval()
    batch = Batch((torch.randn(6, 12),), {})
    assert probe_batch(model, batch) is batch
    cal = Calibrator(model, jaxq.QuantConfig(quantize_first_last=True), [torch.randn(6, 12)], progress=False).run()
    assert cal.quantized_names == ["fc"]


class _TwoInputs(nn.Module):
    """Default float ends need the data flow: the probe runs with autograd on."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.sizes = []

    def forward(self, x):
        self.sizes.append((x.shape[0], torch.is_grad_enabled()))
        return self.head(self.b(torch.relu(self.a(x))))


def test_one_probe_forward_finds_the_ends_and_nothing_is_fused():
    model = _TwoInputs().eval()
    cal = Calibrator(model, jaxq.QuantConfig(), [torch.randn(8, 4)], progress=False)
    assert model.sizes == [(PROBE_SAMPLES, True)]  # no BN: no parity check; autograd on for the data flow
    assert cal.quantized_names == ["b"]  # a first, head last (by data flow)
    assert "first layer" in cal.summary() and "last layer" in cal.summary()
