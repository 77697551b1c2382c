"""Augmented calibration images for the reconstruction steps (`QuantConfig.recon_augment`).

Reconstruction (EasyQuant, AdaRound, GPTQ, BRECQ/QDrop) fits each layer or block to the
float model on the calibration images; with a few photos it learns those photos. Each
augmented copy of a batch transforms every image independently:

- a random resized crop (area 35–100 % of the image, aspect ratio 3:4 to 4:3, log-uniform)
  resampled bilinearly to the input size, mirrored left–right with probability ½;
- colour jitter: each image's contrast scaled by `c ∈ [0.8, 1.2]` about its channel means
  and shifted by `b·σ`, `b ∈ [−0.2, 0.2]` (σ: the image's standard deviation, so the shift
  means the same for normalised and raw pixels);
- with probability ½, mixed with another image of the batch: `λ·x + (1 − λ)·x'`,
  `λ ∈ [0.6, 1]`.

Every draw comes from a generator seeded by `(seed, copy, batch)`: the same seed gives the
same images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bridge.capture.data import CalibrationDataError, as_batch

CROP_AREA = (0.35, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CONTRAST = (0.8, 1.2)
BRIGHTNESS = 0.2
MIX_PROBABILITY = 0.5
MIX_WEIGHT = (0.6, 1.0)


def augmented_batches(batches, copies: int, seed: int) -> list:
    """The batches of `batches`, then `copies` augmented versions of each (same form: a
    tensor, or a tuple/list whose first element is the image tensor `[N, C, H, W]`)."""
    batches = list(batches)
    out = list(batches)
    for copy in range(copies):
        for i, batch in enumerate(batches):
            images = _images_of(batch, i)
            new = augment_images(images, _generator(seed, copy, i))
            out.append(new if isinstance(batch, torch.Tensor) else type(batch)([new, *batch[1:]]))
    return out


def _generator(seed: int, copy: int, batch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, copy, batch]).generate_state(1, np.uint64)[0]))
    return g


def _images_of(batch, index: int) -> torch.Tensor:
    args = as_batch(batch, index).args
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = "no positional tensor" if x is None else f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        raise CalibrationDataError(
            f"QuantConfig.recon_augment augments images: calib_data batch {index} has {shape}; "
            "expected a float tensor [N, C, H, W] (or a tuple/list starting with one); set recon_augment=0"
        )
    return x


def augment_images(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One augmented copy of the images `x` `[N, C, H, W]` (module docstring)."""
    x = _resized_crops(x, g)
    x = _jitter(x, g)
    return _mix(x, g)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _resized_crops(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    area = _uniform(n, *CROP_AREA, g)
    aspect = torch.exp(_uniform(n, math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]), g))
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width and height as fractions of the image
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * (1 - w)  # centre, in [-1, 1] units
    cy = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    contrast = _uniform(n, *CONTRAST, g).to(x.dtype).view(shape)
    shift = _uniform(n, -BRIGHTNESS, BRIGHTNESS, g).to(x.dtype).view(shape)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.flatten(1).std(dim=1).view(shape)
    return mean + contrast * (x - mean) + shift * std


def _mix(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    if n < 2:
        return x
    partner = (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n  # another image, never itself
    weight = _uniform(n, *MIX_WEIGHT, g).to(x.dtype)
    weight = torch.where(torch.rand(n, generator=g) < MIX_PROBABILITY, weight, torch.ones_like(weight))
    weight = weight.view((n,) + (1,) * (x.dim() - 1))
    return weight * x + (1 - weight) * x[partner]
