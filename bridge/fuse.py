"""Conv+BatchNorm fusion, found from the data flow of one real forward pass.

A BatchNorm is folded into the convolution that produced its input when the BN's input
tensor *is* that convolution's output (same object). With `k = γ / √(σ² + ε)`:

    W' = W · k  (per output channel),    b' = (b − μ) · k + β

The BN is replaced by `nn.Identity`. Fusion is kept only if the fused model reproduces
the float model's output on the probe batch (a conv output also used elsewhere would
break that); otherwise the model is left exactly as it was.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from bridge.data import Batch, run_model
from bridge.fakequant import set_module

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV = (nn.Conv1d, nn.Conv2d)


def find_conv_bn_pairs(model: nn.Module, batch: Batch) -> tuple[list[tuple[str, str]], object]:
    """`(conv_name, bn_name)` pairs where the BN consumes exactly the conv's output,
    and the model's output on `batch` (the float reference for the parity check)."""
    producer: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_hook(name):
        def hook(_m, _inp, out):
            producer[id(out)] = name
        return hook

    def bn_hook(name):
        def hook(_m, inp):
            src = producer.get(id(inp[0]))
            if src is not None and (src, name) not in pairs:
                pairs.append((src, name))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, _CONV):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, _BN):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            outputs = run_model(model, batch, 0)  # keep outputs alive: ids stay unique
    finally:
        for h in handles:
            h.remove()
    convs = [c for c, _ in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1], outputs


def fold_bn_into_conv(conv: nn.Module, bn: nn.Module) -> None:
    """`W' = W·k`, `b' = (b − μ)·k + β` with `k = γ/√(σ²+ε)`, in place on `conv`."""
    with torch.no_grad():
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.mul_(k.reshape(shape).to(conv.weight.dtype))
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = ((b - bn.running_mean) * k + beta).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def _max_rel_diff(a, b) -> float:
    fa = [t for t in _flatten(a)]
    fb = [t for t in _flatten(b)]
    worst = 0.0
    for x, y in zip(fa, fb):
        scale = float(x.abs().max()) + 1e-6
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def _flatten(obj):
    if isinstance(obj, torch.Tensor):
        yield obj.float()
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict) or hasattr(obj, "items"):
        for v in obj.values():
            yield from _flatten(v)


def fuse_conv_bn(model: nn.Module, batch: Batch, tolerance: float = 1e-3) -> list[tuple[str, str]]:
    """Fold every eval-mode BN into its producing conv, in place; returns the pairs fused."""
    if model.training:
        return []
    pairs, reference = find_conv_bn_pairs(model, batch)
    if not pairs:
        return []
    backup = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            fold_bn_into_conv(modules[conv_name], modules[bn_name])
            set_module(model, bn_name, nn.Identity())
        fused = run_model(model, batch, 0)
    if _max_rel_diff(reference, fused) > tolerance:
        for _conv, bn_name in pairs:
            set_module(model, bn_name, modules[bn_name])
        for conv_name, _bn in pairs:
            if modules[conv_name].bias is not None and conv_name + ".bias" not in backup:
                modules[conv_name].bias = None
        model.load_state_dict(backup)
        return []
    return pairs
