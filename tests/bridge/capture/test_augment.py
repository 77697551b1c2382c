"""Augmented calibration images for reconstruction (`bridge.capture.augment`, `QuantConfig.recon_augment`)."""

import numpy as np
import pytest
import torch

import jaxq
from bridge.output_check import FORWARDS
from bridge import Calibrator
from bridge.capture.augment import augment_images, augmented_batches
from bridge.capture.data import CalibrationDataError
from bridge.models.digits import load_digits_cnn


def _images(seed=0, n=4):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_the_same_seed_gives_the_same_images_and_the_real_batches_come_first():
    x, y = _images(0), _images(1)
    a = augmented_batches([x, y], copies=2, seed=5)
    b = augmented_batches([x, y], copies=2, seed=5)
    c = augmented_batches([x, y], copies=2, seed=6)
    assert len(a) == 6 and a[0] is x and a[1] is y
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a[2:], c[2:]))
    assert not torch.equal(a[2], a[4])  # each copy is its own draw
    assert all(t.shape == x.shape and torch.isfinite(t).all() for t in a)


def test_a_tuple_batch_keeps_its_other_inputs():
    x, extra = _images(), torch.arange(4)
    out = augmented_batches([(x, extra)], copies=1, seed=0)
    assert isinstance(out[1], tuple) and out[1][1] is extra and out[1][0].shape == x.shape


def test_a_constant_image_stays_constant():
    """Crops, flips, contrast about the mean and a shift in units of the image's σ leave a
    constant image as it is (one image: nothing to mix with)."""
    x = torch.full((1, 3, 8, 8), 0.7)
    torch.testing.assert_close(augment_images(x, torch.Generator().manual_seed(0)), x)


def test_crops_change_the_view():
    x = torch.arange(16.0).repeat(16, 1)[None, None].repeat(8, 3, 1, 1)  # a horizontal ramp
    out = augment_images(x, torch.Generator().manual_seed(1))
    ramps = out[:, 0].diff(dim=-1).mean(dim=(1, 2))
    assert (ramps < 0).any() and (ramps > 0).any()  # some mirrored, some not
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("batch", [torch.arange(6).view(2, 3), {"x": torch.randn(2, 3, 8, 8)}])
def test_batches_that_are_not_images_are_named(batch):
    with pytest.raises(CalibrationDataError, match="recon_augment.*batch 0"):
        augmented_batches([batch], copies=1, seed=0)


@pytest.mark.parametrize("bad", [-1, 65, 1.5, True])
def test_recon_augment_is_validated(bad):
    with pytest.raises(ValueError, match="recon_augment"):
        jaxq.QuantConfig(recon_augment=bad)


def test_reconstruction_reads_the_augmented_images_and_the_observers_the_real_ones(digits_calib):
    cfg = jaxq.QuantConfig(w_bit=4, a_bit=8, keep_acc={"adaround": [True, 20]})
    plain = Calibrator(load_digits_cnn(), cfg, digits_calib, progress=False)
    augmented = Calibrator(load_digits_cnn(), cfg.replace(recon_augment=2), digits_calib, progress=False)
    calls = {}
    for name, cal in (("plain", plain), ("augmented", augmented)):
        counted = []
        cal.model.register_forward_pre_hook(lambda *a, c=counted: c.append(1))
        cal.run()
        calls[name] = len(counted)
    n = len(digits_calib)
    # activations + row sampling (+ bias correction's own pass over the images when augmented)
    # + the result check (bridge.output_check)
    assert calls["plain"] == 2 * n + FORWARDS and calls["augmented"] == n + 3 * n + n + FORWARDS
    for name, r in plain.records.items():
        np.testing.assert_array_equal(augmented.records[name].input_scale, r.input_scale)
    assert any(
        not np.array_equal(augmented.records[n_].codes, r.codes) for n_, r in plain.records.items()
    )  # fitted on other rows
