"""Genie's generator-based distillation (`virtual_data="genie"`)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaxq
from bridge import Calibrator
from bridge.capture import genie
from bridge.capture.genie import Generator, distill_genie_batches
from bridge.capture.synthetic import SyntheticDataError, synthetic_images


class StridedBnNet(nn.Module):
    """A stride-2 convolution (swung while distilling) between two BatchNorms."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(h))).mean((2, 3)))


def _net():
    """BatchNorm statistics of smooth, normalised images (which a generator of normalised
    images can reach; white noise has other spatial statistics)."""
    torch.manual_seed(0)
    net = StridedBnNet()
    smooth = F.interpolate(torch.randn(64, 3, 4, 4), size=(8, 8), mode="bilinear")
    smooth = (smooth - smooth.mean((0, 2, 3), keepdim=True)) / smooth.std((0, 2, 3), keepdim=True)
    for bn in (net.bn1, net.bn2):
        bn.momentum = 1.0  # the running statistics become the smooth images'
    with torch.no_grad():
        net.train()(smooth)
    return net.eval()


def _bn_gap(net, x) -> float:
    """`Σ_BN ‖μ_B(x) − μ_run‖ + ‖σ_B(x) − σ_run‖` of the model on `x`."""
    gaps = []

    def hook(module, args):
        h = args[0]
        std = torch.sqrt(h.var((0, 2, 3), unbiased=False) + module.eps)
        target = torch.sqrt(module.running_var + module.eps)
        gaps.append((h.mean((0, 2, 3)) - module.running_mean).norm() + (std - target).norm())

    handles = [bn.register_forward_pre_hook(hook) for bn in (net.bn1, net.bn2)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return float(sum(gaps))


def test_the_generator_gives_images_of_any_size_normalised_per_channel():
    torch.manual_seed(0)
    for h, w in ((8, 8), (10, 7), (224, 224)):
        x = Generator(3, h, w).train()(torch.randn(4, genie.LATENT_DIM))
        assert x.shape == (4, 3, h, w)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_genie_images_match_the_bn_statistics_better_than_noise():
    net = _net()
    (images,) = distill_genie_batches(net, ((8, 3, 8, 8),), steps=400, seed=0, progress=False)
    assert images.shape == (8, 3, 8, 8) and not images.requires_grad
    noise = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert _bn_gap(net, images) < 0.7 * _bn_gap(net, noise)


def test_genie_repeats_for_a_seed_and_leaves_the_model_and_the_global_rng_alone():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    first = distill_genie_batches(net, ((4, 3, 8, 8),), steps=5, seed=3, progress=False)[0]
    assert torch.equal(torch.get_rng_state(), rng)
    again = distill_genie_batches(net, ((4, 3, 8, 8),), steps=5, seed=3, progress=False)[0]
    other = distill_genie_batches(net, ((4, 3, 8, 8),), steps=5, seed=4, progress=False)[0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.conv2._forward_pre_hooks  # the swing and statistics hooks went with the copy


def test_strided_convolutions_read_their_input_shifted_by_at_most_one_pixel():
    net = _net()
    x = torch.randn(2, 8, 8, 8)
    seen = []
    handles = genie._swing_hooks(net, np.random.default_rng(0))
    net.conv2.register_forward_pre_hook(lambda m, a: seen.append(a[0]) or None)  # after the swing
    net.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0]) or None)  # stride 1: never swung
    for _ in range(12):
        net.conv2(x)
    net.conv1(torch.zeros(2, 3, 8, 8))
    padded = F.pad(x, [1] * 4, mode="reflect")
    crops = {(dy, dx): padded[..., dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)}
    shifts = [next((d for d, crop in crops.items() if torch.equal(y, crop)), None) for y in seen[:12]]
    assert None not in shifts and len(set(shifts)) > 3  # each a reflect-padded crop; several shifts
    assert torch.equal(seen[12], torch.zeros(2, 3, 8, 8))
    for h in handles:
        h.remove()


def test_genie_is_refused_by_name_without_batchnorm_or_an_image_input():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(SyntheticDataError, match=r"virtual_data='genie' needs BatchNorm layers"):
        distill_genie_batches(plain, ((2, 3, 8, 8),), steps=1, progress=False)
    vectors = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(SyntheticDataError, match=r"generates images: the model must take one input \[N, C, H, W\]"):
        Calibrator(vectors, jaxq.QuantConfig(input_shape=[2, 3], virtual_data="genie"), progress=False)


def test_data_free_genie_calibrates_with_bias_correction_on():
    cfg = jaxq.QuantConfig(input_shape=[8, 3, 8, 8], virtual_data="genie", virtual_steps=20)
    cal = Calibrator(_net(), cfg, progress=False)
    assert cal.cfg.bias_correction is True  # distilled data counts as representative
    assert cal.calib_data[0].shape == (8, 3, 8, 8)
    cal.run()
    assert cal.output_cosine is not None and cal.output_cosine > 0.9


def test_recon_synthetic_uses_genie_when_virtual_data_says_so(monkeypatch):
    calls = []
    real = genie.distill_genie_batches
    monkeypatch.setattr(genie, "distill_genie_batches", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    images = synthetic_images(_net(), [torch.randn(4, 3, 8, 8)], 6, 3, 0.1, 0, progress=False, method="genie")
    assert calls == [((4, 3, 8, 8),), ((2, 3, 8, 8),)]
    assert [tuple(b.shape) for b in images] == [(4, 3, 8, 8), (2, 3, 8, 8)]
