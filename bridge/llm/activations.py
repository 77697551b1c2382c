"""Activation quantization of a decoder's Linear inputs, as forward pre-hooks.

Symmetric signed `b`-bit fake quantization `x̂ = clamp(round(x/s), −2^(b−1), 2^(b−1)−1)·s`:

    dynamic   per token: `s = max|x_token| / ((2^b − 1)/2)`, computed on every call
    static    per tensor: `s = max|x| / (2^(b−1)−1)` over the calibration inputs, fixed

The dynamic scale divides by half the grid's width, as compressed-tensors computes it
when `transformers` runs an exported checkpoint, so both give the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn


class ActQuant:
    """A forward pre-hook that fake-quantizes a Linear's input (module docstring)."""

    def __init__(self, bits: int, scale: float | None):
        self.qmax = 2 ** (bits - 1) - 1
        self.half_range = (2**bits - 1) / 2
        self.scale = scale  # None: dynamic per token

    def __call__(self, _module, args):
        x = args[0]
        if self.scale is None:
            s = (x.detach().abs().amax(dim=-1, keepdim=True) / self.half_range).clamp_min(
                torch.finfo(torch.float32).eps
            )
        else:
            s = torch.tensor(self.scale, dtype=x.dtype)
        q = torch.clamp(torch.round(x / s), -self.qmax - 1, self.qmax)
        x_hat = x + (q * s - x).detach()  # straight-through: gradients reach x unchanged
        return (x_hat, *args[1:])


def install(model: nn.Module, quantizers: dict[str, ActQuant]) -> list:
    """Register each `ActQuant` on the Linear named by its key; returns the hook handles."""
    return [model.get_submodule(name).register_forward_pre_hook(q) for name, q in quantizers.items()]
