"""BN-statistics synthetic images for the fitting steps (`QuantConfig.recon_synthetic`)."""

import pytest
import torch
from torch import nn

import jaxq
from bridge import Calibrator
from bridge.capture.synthetic import SyntheticDataError, synthetic_images


class BnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = BnNet().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net


def test_synthetic_images_are_shaped_like_the_calibration_images_and_repeat_for_a_seed():
    net, data = _net(), [torch.randn(4, 3, 8, 8) for _ in range(2)]
    first = synthetic_images(net, data, 10, steps=5, lr=0.1, seed=3, progress=False)
    assert [tuple(b.shape) for b in first] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    again = synthetic_images(net, data, 10, steps=5, lr=0.1, seed=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = synthetic_images(net, data, 10, steps=5, lr=0.1, seed=4, progress=False)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # each batch from its own seed


def test_synthetic_images_match_the_bn_statistics_better_than_noise():
    net, data = _net(), [torch.randn(8, 3, 8, 8)]
    (images,) = synthetic_images(net, data, 8, steps=100, lr=0.1, seed=0, progress=False)

    def bn_gap(x):
        with torch.no_grad():
            h = net.conv(x)
        return (h.mean((0, 2, 3)) - net.bn.running_mean).norm().item()

    assert bn_gap(images) < 0.5 * bn_gap(torch.randn(8, 3, 8, 8))


def test_a_model_without_batchnorm_or_batches_that_are_not_images_are_refused_by_name():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(SyntheticDataError, match="recon_synthetic=4 needs BatchNorm layers.*set it to 0"):
        synthetic_images(plain, [torch.randn(2, 3, 8, 8)], 4, 5, 0.1, 0)
    with pytest.raises(SyntheticDataError, match=r"recon_synthetic=4 .*batch 0 is tuple .*expected a float image"):
        synthetic_images(_net(), [(torch.randn(2, 3, 8, 8), torch.ones(2))], 4, 5, 0.1, 0)


def test_recon_synthetic_needs_a_fitting_step_and_a_range():
    with pytest.raises(ValueError, match="recon_synthetic=8 distils images for the steps that fit"):
        jaxq.QuantConfig(recon_synthetic=8)
    with pytest.raises(ValueError, match=r"recon_synthetic=-1 must be an int in \[0, 4096\]"):
        jaxq.QuantConfig(recon_synthetic=-1, keep_acc={"adaround": [True, 10]})


def test_block_reconstruction_fits_the_synthetic_images_and_never_holds_them_out(monkeypatch):
    from jaxq import block_reconstruction as br

    splits = []
    real_split = br.holdout_split
    monkeypatch.setattr(br, "holdout_split", lambda *a: splits.append(a[1:]) or real_split(*a))
    net, data = _net(), [torch.randn(4, 3, 8, 8) for _ in range(3)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = jaxq.QuantConfig(
        w_bit=4,
        quantize_first_last=True,
        bias_correction=False,
        keep_acc={"brecq": [True, 8]},
        recon_augment=1,
        recon_synthetic=6,
        recon_holdout=0.25,
        virtual_steps=3,
    )
    cal = Calibrator(net, cfg, data, progress=False)
    cal.restore()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # distilling left the model alone
    cal = Calibrator(net, cfg, data, progress=False).run()
    # 12 images, 12 augmented copies, then 6 synthetic images (fitted, never held out)
    assert splits and all(s == (30, 12, 0.25, 6) for s in splits)
    assert len(cal.reports["blocks"]) == 2
