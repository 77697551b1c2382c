"""What one layer of a model saw and gave in a forward pass, for bit-exact layer tests."""

from __future__ import annotations

import torch
from torch import nn


def seen_io(layer: nn.Module, model: nn.Module, *args) -> dict[str, torch.Tensor]:
    """`model(*args)` without gradients; returns `{"x": layer's input, "y": its output}`,
    `x` as the layer was called with it (before jaxq's own input hook)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0]), prepend=True),
        layer.register_forward_hook(lambda _m, _a, y: seen.update(y=y)),
    ]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen
