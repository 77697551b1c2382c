"""Conv+BatchNorm fusion, found from the data flow of one real forward pass.

A BatchNorm is folded into the convolution that produced its input when the BN's input
tensor *is* that convolution's output (same object). With `k = γ / √(σ² + ε)`:

    W' = W · k  (per output channel),    b' = (b − μ) · k + β

The BN is replaced by `nn.Identity`. Fusion is kept only if the fused model reproduces
the float model's output on the probe batch (a conv output also used elsewhere would
break that); otherwise the model is left exactly as it was. Each fold is a `Fold`
record that `unfold` undoes bit for bit — or, when the folded conv was trained since
(fine-tuning through the quantized model), by the inverse map on its trained values
(`W = W'/k`, `b = (b' − β)/k + μ`), so the BN comes back and the training is kept.

The data flow is keyed on the conv outputs themselves (weak references), not on
`id()` alone: a freed output's id may be reused by a later tensor.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn

from bridge.capture.data import Batch, run_hooked, run_model
from bridge.inplace.fakequant import set_module
from bridge.capture.tensors import tensors_in

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV = (nn.Conv1d, nn.Conv2d)


class PairRecorder:
    """Hooks that record, in one forward, each BN whose input is exactly a conv's output."""

    def __init__(self, model: nn.Module):
        self.producer: dict[int, tuple[str, weakref.ref]] = {}
        self.found: list[tuple[str, str]] = []
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, _CONV):
                self.handles.append(m.register_forward_hook(self._conv_hook(name)))
            elif isinstance(m, _BN):
                self.handles.append(m.register_forward_pre_hook(self._bn_hook(name)))

    def _conv_hook(self, name):
        def hook(_m, _inp, out):
            if isinstance(out, torch.Tensor):
                self.producer[id(out)] = (name, weakref.ref(out))

        return hook

    def _bn_hook(self, name):
        def hook(_m, inp):
            if not inp or not isinstance(inp[0], torch.Tensor):
                return
            entry = self.producer.get(id(inp[0]))
            if entry is not None and entry[1]() is inp[0] and (entry[0], name) not in self.found:
                self.found.append((entry[0], name))

        return hook

    def pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """`(conv_name, bn_name)` pairs to fold: each conv feeds one BN of its channels."""
        convs = [c for c, _ in self.found]
        modules = dict(model.named_modules())
        return [(c, b) for c, b in self.found if convs.count(c) == 1 and _channels_match(modules[c], modules[b])]


def find_conv_bn_pairs(model: nn.Module, batch: Batch) -> tuple[list[tuple[str, str]], object]:
    """`(conv_name, bn_name)` pairs where the BN consumes exactly the conv's output,
    and the model's output on `batch` (the float reference for the parity check)."""
    recorder = PairRecorder(model)
    outputs = run_hooked(model, batch, recorder.handles)
    return recorder.pairs(model), outputs


def _channels_match(conv: nn.Module, bn: nn.Module) -> bool:
    return conv.weight.shape[0] == bn.num_features and bn.track_running_stats and bn.running_mean is not None


@dataclasses.dataclass
class Fold:
    """A BN folded into a conv: what `unfold` needs to undo it exactly."""

    conv: str
    bn: str
    bn_module: nn.Module
    weight: torch.Tensor  # the conv's weight before folding (a copy)
    bias: torch.Tensor | None  # the conv's bias before folding (a copy), None if it had none

    @property
    def pair(self) -> tuple[str, str]:
        return (self.conv, self.bn)


def fold(model: nn.Module, conv_name: str, bn_name: str) -> Fold:
    """Fold BN `bn_name` into conv `conv_name` in place and replace it by `nn.Identity`."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    record = Fold(
        conv_name, bn_name, bn, conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
    )
    fold_bn_into_conv(conv, bn)
    set_module(model, bn_name, nn.Identity())
    return record


def _trained_since_fold(conv: nn.Module, record: Fold) -> bool:
    """Whether the conv's values differ from the fold of its recorded weights (recomputed)."""
    weight, bias = folded_values(record.weight, record.bias, record.bn_module)
    return not (torch.equal(conv.weight, weight) and conv.bias is not None and torch.equal(conv.bias, bias))


def unfold(model: nn.Module, record: Fold) -> None:
    """Undo `fold`: the conv's weight and bias and the BN are exactly as before — or, if
    the folded conv was trained since, the BN's inverse map of its trained values."""
    conv = model.get_submodule(record.conv)
    if _trained_since_fold(conv, record):
        _unfold_trained(conv, record)
        set_module(model, record.bn, record.bn_module)
        return
    with torch.no_grad():
        conv.weight.copy_(record.weight)
        if record.bias is None:
            conv.bias = None
        else:
            conv.bias.copy_(record.bias)
    set_module(model, record.bn, record.bn_module)


def _unfold_trained(conv: nn.Module, record: Fold) -> None:
    """`W = W'/k`, `b = (b' − β)/k + μ` on the trained folded values (float64, then cast);
    a channel with `k = 0` keeps its weight from before the fold. A conv that had no bias
    gets one when training made `b` non-zero."""
    bn = record.bn_module
    with torch.no_grad():
        var = bn.running_var.double()
        k = (bn.weight.double() if bn.affine else 1.0) / torch.sqrt(var + bn.eps)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        safe = torch.where(k == 0, torch.ones_like(k), k)
        w = torch.where((k == 0).reshape(shape), record.weight.double(), conv.weight.double() / safe.reshape(shape))
        b = torch.where(
            k == 0,
            torch.zeros_like(k) if record.bias is None else record.bias.double(),
            (conv.bias.double() - beta) / safe + bn.running_mean.double(),
        )
        conv.weight.copy_(w.to(conv.weight.dtype))
        if record.bias is None and not bool(b.any()):
            conv.bias = None
        else:
            conv.bias.copy_(b.to(conv.bias.dtype))


def folded_values(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """`W' = W·k`, `b' = (b − μ)·k + β` with `k = γ/√(σ²+ε)` (new tensors)."""
    with torch.no_grad():
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        new_weight = weight * k.reshape(shape).to(weight.dtype)
        b = bias if bias is not None else torch.zeros_like(bn.running_mean)
        return new_weight, ((b - bn.running_mean) * k + beta).to(weight.dtype)


def fold_bn_into_conv(conv: nn.Module, bn: nn.Module) -> None:
    """`folded_values` written into `conv` in place."""
    weight, bias = folded_values(conv.weight, conv.bias, bn)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias)
        else:
            conv.bias.copy_(bias)


def _max_rel_diff(a, b) -> float:
    fa = [t.float() for t in tensors_in(a)]
    fb = [t.float() for t in tensors_in(b)]
    worst = 0.0
    for x, y in zip(fa, fb):
        scale = float(x.abs().max()) + 1e-6
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def fuse_conv_bn(model: nn.Module, batch: Batch, tolerance: float = 1e-3) -> list[Fold]:
    """Fold every eval-mode BN into its producing conv, in place; returns the folds made
    (none if the fused model does not reproduce the float output on `batch`)."""
    if model.training:
        return []
    pairs, reference = find_conv_bn_pairs(model, batch)
    return fuse_pairs(model, pairs, reference, batch, tolerance)


def fuse_pairs(model: nn.Module, pairs, reference, batch: Batch, tolerance: float = 1e-3) -> list[Fold]:
    """Fold the found `pairs`, in place, kept only if the model's output on `batch` stays
    within `tolerance` of `reference` (its float output there); returns the folds made."""
    folds: list[Fold] = []
    try:
        for conv_name, bn_name in pairs:
            folds.append(fold(model, conv_name, bn_name))
        if folds:
            with torch.no_grad():
                fused = run_model(model, batch, 0)
            if _max_rel_diff(reference, fused) > tolerance:
                raise _ParityError
    except BaseException as e:
        for record in reversed(folds):
            unfold(model, record)
        if isinstance(e, _ParityError):
            return []
        raise
    return folds


class _ParityError(Exception):
    pass
