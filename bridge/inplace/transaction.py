"""A calibration as a transaction on the user's model.

`ModelEdit` logs every change jaxq makes to the model — train/eval flags, the device,
Conv+BN folds, quantizers attached in place, functional taps — so `restore()` gives the
user back exactly the model they passed in (same module tree, same parameter objects,
bit-identical `state_dict`), and a failure in `Calibrator(...)` or `run()` rolls back.
`float_copy()` builds a float copy on demand, so no second copy of a large model is kept
when nothing needs it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bridge.inplace.fakequant import LayerQuantizer, quantizer_of, model_quantizers, remove_hooks_of
from bridge.inplace.functional import FunctionalTaps
from bridge.inplace.fuse import Fold, unfold


class QuantizedModelError(ValueError):
    """The model already carries jaxq quantizers."""


def refuse_quantized(model: nn.Module) -> None:
    """Raise if `model` already carries jaxq quantizers (a second config on the same object)."""
    found = list(model_quantizers(model))
    if found:
        raise QuantizedModelError(
            f"the model already carries jaxq quantizers (layers {found[:3]}{'…' if len(found) > 3 else ''}); "
            "call restore() on the Calibrator that made them to get the float model back, or pass a fresh model"
        )


def _first_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


class ModelEdit:
    """The undo log of one calibration's changes to `model`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.training = {id(m): m.training for m in model.modules()}
        self.device = _first_device(model)
        self.folds: list[Fold] = []
        self.quantizers: dict[str, LayerQuantizer] = {}
        self.taps: FunctionalTaps | None = None
        self.replaced: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its value before jaxq wrote it)
        self.hooks: list = []  # handles of hooks jaxq added besides the quantizers' (input rotations)
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def revert_buffers(self) -> list[str]:
        """Give back the model's own buffers that its forwards changed while jaxq ran them
        (counters, running statistics updated by a custom forward); returns their names."""
        names = {id(b): n for n, b in self.model.named_buffers()}
        changed = []
        with torch.no_grad():
            for b, value in self.buffers:
                if not torch.equal(b, value):
                    changed.append(names.get(id(b), "?"))
                    b.copy_(value)
        return changed

    def attach(self, quantizer: LayerQuantizer) -> None:
        self.quantizers[quantizer.name] = quantizer

    def restore(self) -> nn.Module:
        """Undo everything, newest first; the model is as it was passed in."""
        if self.taps is not None:
            self.taps.remove()
            self.taps = None
        for q in reversed(list(self.quantizers.values())):
            if quantizer_of(q.module) is q:
                q.detach()
        self.quantizers.clear()
        for handle in reversed(self.hooks):
            handle.remove()
        self.hooks.clear()
        self.revert_buffers()
        with torch.no_grad():
            for tensor, before in reversed(self.replaced):
                tensor.copy_(before)
        self.replaced.clear()
        for record in reversed(self.folds):
            unfold(self.model, record)
        self.folds.clear()
        device = _first_device(self.model)
        if self.device is not None and device is not None and device != self.device:
            self.model.to(self.device)
        for m in self.model.modules():
            if id(m) in self.training:
                m.training = self.training[id(m)]
        return self.model

    def float_copy(self) -> nn.Module:
        """A float copy (eval mode) of the model as it was passed in: the quantizers and
        folds are undone on the copy; the model itself is untouched."""
        fold_names = [(f.conv, f.bn) for f in self.folds]
        clone = quantizer_free_copy(self.model)
        for f, (conv, bn) in zip(reversed(self.folds), reversed(fold_names)):
            unfold(clone, Fold(conv, bn, copy.deepcopy(f.bn_module), f.weight, f.bias))
        return clone.eval()


def quantizer_free_copy(model: nn.Module) -> nn.Module:
    """A deep copy (eval mode) of a quantized model without its quantizers and taps; its
    BN folds stay (the float model the quantizers were calibrated on)."""
    clone = copy.deepcopy(model)
    for q in model_quantizers(clone).values():
        q.detach()
    for m in clone.modules():
        remove_hooks_of(m, FunctionalTaps)
    return clone.eval()
