"""Genie's generator-based distillation (Jeon et al., CVPR 2023, "Genie-D"): synthetic images
for data-free calibration (`QuantConfig(virtual_data="genie")`) and for the fitting steps
(`recon_synthetic` with `virtual_data="genie"`).

Where ZeroQ's distillation (`bridge.capture.synthetic.distill_bn_batches`) optimises the
pixels, Genie draws the images from a small generator `x = G(z)` and learns its weights and
every image's latent `z` together:

    min_{G, z}  Σ_BN (‖μ_B(x) − μ_run‖² + ‖σ_B(x) − σ_run‖²) / C_BN
                + (‖μ_img(x)‖² + ‖σ_img(x) − 1‖²) / N

`μ_B, σ_B`: the per-channel mean and standard deviation of a BatchNorm's input over the
batch and spatial axes; `μ_img, σ_img` `[N, C]`: each image's own channel statistics, which
keeps every image normalised rather than only the batch. The generator (a linear layer to a
quarter-size map, two ×2 upsamplings with 3×3 convolutions, BatchNorms and LeakyReLU, a
tanh and a final BatchNorm without affine) shares structure across the images, so they
come out smoother than optimised pixels. Strided convolutions read their input shifted by
up to one pixel (reflect padding; "swing convolution"), drawn at random each step, so the
images cannot fit one sampling phase of the stride. Adam: the latents at `LATENT_LR` (lowered
on a plateau), the generator at `GENERATOR_LR` (× 0.95 every 100 steps), as in the paper.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bridge.capture.synthetic import SyntheticDataError, bn_loss_hooks, bn_layers, check_distilled

LATENT_DIM = 256
LATENT_LR = 0.1
GENERATOR_LR = 0.01
SWING = 1  # pixels of jitter of a strided convolution's input


class Generator(nn.Module):
    """`z [N, LATENT_DIM]` → images `[N, C, H, W]`, normalised per channel over the batch."""

    def __init__(self, channels: int, height: int, width: int, latent_dim: int = LATENT_DIM, c1=128, c2=64):
        super().__init__()
        self.size = (height, width)
        self.start = (-(-height // 4), -(-width // 4))
        self.linear = nn.Linear(latent_dim, c1 * self.start[0] * self.start[1])
        self.layers = nn.Sequential(
            nn.BatchNorm2d(c1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c2, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.linear(z).view(z.shape[0], -1, *self.start)
        return self.layers(x)[:, :, : self.size[0], : self.size[1]]


def _swing_hooks(model: nn.Module, rng: np.random.Generator) -> list:
    """Forward pre-hooks that shift each strided `Conv2d`'s input by a random offset in
    `[-SWING, SWING]²` (reflect padding, the same size)."""

    def hook(module, args):
        x = args[0]
        if x.shape[-1] <= SWING or x.shape[-2] <= SWING:
            return None
        dy, dx = rng.integers(0, 2 * SWING + 1, size=2)
        padded = F.pad(x, [SWING] * 4, mode="reflect")
        return (padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]], *args[1:])

    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1)]
    return [m.register_forward_pre_hook(hook) for m in strided]


def _image_statistics_loss(x: torch.Tensor) -> torch.Tensor:
    """`(‖μ_img‖² + ‖σ_img − 1‖²) / N` over each image's channels."""
    std, mean = torch.std_mean(x, dim=(2, 3))
    return (mean.square().sum() + (std - 1).square().sum()) / x.shape[0]


def distill_genie_batches(
    model: nn.Module,
    input_shape: tuple[tuple[int, ...], ...],
    steps: int = 200,
    seed: int = 0,
    progress: bool = True,
    field: str = "virtual_data='genie'",
) -> list:
    """One batch of images `[N, C, H, W]` (the model's only input) drawn from a generator
    trained `steps` Adam steps so the model's BatchNorms see their running statistics
    (module docstring); the same `seed` gives the same images. `field`: the option that
    asked for them, named in errors."""
    if len(input_shape) != 1 or len(input_shape[0]) != 4:
        raise SyntheticDataError(
            f"QuantConfig.{field} generates images: the model must take one input [N, C, H, W], "
            f"got input shapes {[tuple(s) for s in input_shape]}; use virtual_data='bn_stats'"
        )
    if not bn_layers(model):
        raise SyntheticDataError(f"QuantConfig.{field} needs BatchNorm layers, and {type(model).__name__} has none")
    n, c, h, w = input_shape[0]
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):  # the generator's initialisation leaves the user's RNG as it was
        torch.manual_seed(seed)
        generator = Generator(c, h, w).to(device).train()
        z = torch.randn(n, LATENT_DIM).to(device).requires_grad_(True)
    opt_z = torch.optim.Adam([z], lr=LATENT_LR)
    opt_g = torch.optim.Adam(generator.parameters(), lr=GENERATOR_LR)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=100, min_lr=1e-4)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.95)
    losses: list = []
    handles = bn_loss_hooks(model, losses, squared=True) + _swing_hooks(model, np.random.default_rng(seed))
    try:
        for step in tqdm(range(steps), desc="jaxq genie data", unit="step", disable=not progress):
            losses.clear()
            opt_z.zero_grad()
            opt_g.zero_grad()
            x = generator(z)
            model(x)
            loss = torch.stack(losses).sum() + _image_statistics_loss(x)
            loss.backward()
            opt_z.step()
            opt_g.step()
            plateau.step(float(loss.detach()))
            if (step + 1) % 100 == 0:
                decay.step()
    finally:
        for handle in handles:
            handle.remove()
    images = x.detach()
    check_distilled((images,), f"QuantConfig.{field}: the generated images diverged to NaN/Inf in {steps} steps")
    return [images]
