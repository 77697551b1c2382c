"""Synthetic calibration data for data-free mode (`quant_mode=0`).

- `uniform_batches`: msModelSlim's virtual data, `torch.rand(input_shape)` (see
  `bridge.capture.data.virtual_batch`).
- `distill_bn_batches`: ZeroQ-style distilled data (Cai et al., CVPR 2020). Inputs `x`
  start as N(0, 1) noise and are optimised with Adam so that every BatchNorm layer sees
  the statistics it was trained on:

      min_x  Σ_BN  ‖μ_B(x) − μ_run‖₂ + ‖σ_B(x) − √(σ²_run)‖₂

  where `μ_B, σ_B` are the per-channel mean and standard deviation of the BN input over
  batch and spatial axes. Needs a model with BatchNorm layers, run before fusion.
- `bridge.capture.genie.distill_genie_batches`: Genie's generator-based distillation
  (`virtual_data="genie"`).
- `synthetic_images`: either distillation shaped like the calibration images, for the
  fitting steps (`QuantConfig.recon_synthetic`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class SyntheticDataError(ValueError):
    """Synthetic data cannot be made for this model."""


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers, whose running statistics the distillations match."""
    return [m for m in model.modules() if isinstance(m, _BN)]


def check_distilled(inputs: tuple, message: str) -> None:
    """Raise `SyntheticDataError(message)` if any distilled input holds NaN or Inf."""
    if not all(bool(torch.isfinite(x).all()) for x in inputs):
        raise SyntheticDataError(message)


def bn_loss_hooks(model: nn.Module, losses: list, squared: bool = False):
    """Forward pre-hooks adding each BatchNorm input's `‖μ_B − μ_run‖ + ‖σ_B − σ_run‖`
    (`squared`: Genie's `(‖μ_B − μ_run‖² + ‖σ_B − σ_run‖²) / C`) to `losses`."""

    def hook(module, args):
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = torch.sqrt(x.var(dim=dims, unbiased=False) + module.eps)
        gaps = (mean - module.running_mean, std - torch.sqrt(module.running_var + module.eps))
        if squared:
            losses.append(sum(g.square().sum() for g in gaps) / mean.numel())
        else:
            losses.append(sum(torch.linalg.vector_norm(g) for g in gaps))

    return [m.register_forward_pre_hook(hook) for m in bn_layers(model)]


def distill_bn_batches(
    model: nn.Module,
    input_shape: tuple[tuple[int, ...], ...],
    steps: int = 200,
    lr: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    field: str = "virtual_data='bn_stats'",
) -> list:
    """One batch of inputs (shapes `input_shape`) whose BN statistics match the model's.
    `field`: the option that asked for them, named in errors."""
    if not bn_layers(model):
        other = "use virtual_data='uniform' or pass calib_data" if field.startswith("virtual") else "set it to 0"
        raise SyntheticDataError(
            f"QuantConfig.{field} needs BatchNorm layers, and {type(model).__name__} has none; {other}"
        )
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=g).to(device).requires_grad_(True) for shape in input_shape]
    opt = torch.optim.Adam(inputs, lr=lr)
    losses: list = []
    handles = bn_loss_hooks(model, losses)
    try:
        for _ in tqdm(range(steps), desc="jaxq distill data", unit="step", disable=not progress):
            losses.clear()
            opt.zero_grad()
            model(*inputs)
            loss = torch.stack(losses).sum()
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    out = tuple(x.detach() for x in inputs)
    check_distilled(
        out,
        f"QuantConfig.virtual_lr={lr!r}: the distilled virtual data diverged to NaN/Inf in "
        f"{steps} Adam steps; use a smaller virtual_lr (default 0.2)",
    )
    return [out[0] if len(out) == 1 else out]


def synthetic_images(
    model: nn.Module,
    calib_data,
    count: int,
    steps: int,
    lr: float,
    seed: int,
    progress: bool = True,
    method: str = "bn_stats",
) -> list[torch.Tensor]:
    """`count` images distilled from `model`'s BN statistics (`method`: `"bn_stats"`,
    ZeroQ's pixels at learning rate `lr`, or `"genie"`, Genie's generator), shaped like the
    first calibration batch's images `[N, C, H, W]` and distilled `N` at a time (batch `k`
    from seed `(seed, k)`), on the CPU. The batches of `calib_data` must be image tensors
    (or one-element tuples/lists of one)."""
    from bridge.capture.genie import distill_genie_batches

    first = next(iter(calib_data))
    x = first[0] if isinstance(first, (tuple, list)) and len(first) == 1 else first
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise SyntheticDataError(
            f"QuantConfig.recon_synthetic={count} distils images like calib_data's; batch 0 is "
            f"{type(first).__name__} {tuple(getattr(x, 'shape', ()))}, expected a float image tensor "
            "[N, C, H, W] as the model's only input; set recon_synthetic=0"
        )
    n, c, h, w = x.shape
    field = f"recon_synthetic={count}"
    out = []
    for k, start in enumerate(range(0, count, n)):
        batch_seed = int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint32)[0])
        shape = ((min(n, count - start), c, h, w),)
        if method == "genie":
            (images,) = distill_genie_batches(model, shape, steps, batch_seed, progress, field)
        else:
            (images,) = distill_bn_batches(model, shape, steps, lr, batch_seed, progress, field)
        out.append(images.to("cpu", x.dtype))
    return out
