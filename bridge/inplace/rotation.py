"""Online rotation of quantized Linear layers' inputs (`QuantConfig.rotate_inputs`).

For an orthogonal `Q`, `x·Wᵀ = (x·Q)·(W·Q)ᵀ`: the layer's weight becomes `W·Q` and a
forward pre-hook multiplies its input by `Q`, so the model computes the same function (to
float32 rounding) while its quantizers see the rotated weight and input, whose outlier
channels are spread over blocks of `b` channels. `Q = kron(I, H_b/√b)·diag(±1)`
(`jaxq.rotation.random_hadamard_parts`), so the hook costs `b` multiply-adds per value.

The hook is registered before the layer's quantizer, so every consumer of the layer's
input — observers, row capture, SmoothQuant, the JAX model's lowering — sees `x·Q`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from jaxq.rotation import random_hadamard_parts


class InputRotation:
    """Forward pre-hook `x → x·Q` on a Linear layer of input width `width`."""

    def __init__(self, width: int, seed: int):
        block, signs = random_hadamard_parts(width, seed)
        self.width, self.seed = width, seed
        self.block = torch.from_numpy(block)  # float64 [b, b]
        self.signs = torch.from_numpy(signs)  # float64 [width]
        self._converted: dict = {}

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """`x·Q` over the last axis, in `x`'s dtype."""
        b = self.block.shape[0]
        if type(x) is torch.Tensor:
            block, signs = self._in(x.dtype, x.device)
        else:  # a tensor subclass (torchax's, while the JAX model is lowered): constants made by its own ops
            block, signs = x.new_tensor(self.block.numpy()), x.new_tensor(self.signs.numpy())
        return (x.unflatten(-1, (self.width // b, b)) @ block).flatten(-2) * signs

    def _in(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(block, signs)` in `dtype` on `device`, converted once rather than on every call."""
        key = (dtype, device)
        if key not in self._converted:
            self._converted[key] = (self.block.to(device, dtype), self.signs.to(device, dtype))
        return self._converted[key]

    def __call__(self, _module, args):
        return (self.rotate(args[0]), *args[1:])


def rotatable(module: nn.Module) -> bool:
    """A Linear layer whose weight is a plain Parameter (not parametrized by the user)."""
    return isinstance(module, nn.Linear) and not parametrize.is_parametrized(module)


def rotate_inputs(layers: dict[str, nn.Module], seed: int, edit) -> dict[str, InputRotation]:
    """Rotate the inputs of the `rotatable` `layers` in place (module docstring), logged in
    `edit` (`bridge.inplace.transaction.ModelEdit`) for `restore()`; the i-th layer's `Q`
    is drawn from `seed + i`. Returns the rotations by layer name."""
    rotations = {}
    for i, (name, module) in enumerate(layers.items()):
        if not rotatable(module):
            continue
        rotation = InputRotation(module.in_features, seed + i)
        w = module.weight
        edit.replaced.append((w, w.detach().clone()))
        with torch.no_grad():
            w.copy_(rotation.rotate(w.detach().double()).to(w.dtype))
        edit.hooks.append(module.register_forward_pre_hook(rotation))
        rotations[name] = rotation
    return rotations


def rotation_of(module: nn.Module) -> InputRotation | None:
    """The layer's `InputRotation` hook, if it has one."""
    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, InputRotation)), None)
