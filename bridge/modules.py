"""Finding quantizable layers and describing them as `jaxq.LayerSpec`."""
from __future__ import annotations

import difflib
import fnmatch

import torch
from torch import nn

from jaxq import LayerSpec

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LayerNameError(ValueError):
    """A `disable_names` entry matches no quantizable layer."""


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every `nn.Linear` / `nn.Conv1d` / `nn.Conv2d` (subclasses included), in module order.

    Modules already wrapped by a fake-quant wrapper are reported under their own name.
    """
    from bridge.fakequant import QuantWrapper

    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantWrapper):
            out[name] = module.module
        elif isinstance(module, QUANTIZABLE) and not _inside_wrapper(name, out):
            out[name] = module
    return out


def _inside_wrapper(name: str, found: dict) -> bool:
    return any(name.startswith(f"{n}.") for n in found)


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    """The `LayerSpec` of a torch layer (its own `forward` may still do more, e.g. pad)."""
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", has_bias=has_bias)
    kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
    if isinstance(module.padding, str):
        raise ValueError(f"layer {name!r}: string padding {module.padding!r} is not supported by LayerSpec")
    padding = [(p, p) for p in module.padding]
    static = getattr(module, "static_padding", None)  # TF-"same" convs that pad in forward
    if isinstance(static, (nn.ZeroPad1d, nn.ZeroPad2d)):
        pads = static.padding  # (left, right[, top, bottom]): last spatial dim first
        extra = [tuple(pads[i:i + 2]) for i in range(0, len(pads), 2)][::-1]
        padding = [(lo + a, hi + b) for (lo, hi), (a, b) in zip(padding, extra)]
    return LayerSpec(
        name,
        kind,
        stride=tuple(module.stride),
        padding=tuple(padding),
        kernel=tuple(module.kernel_size),
        dilation=tuple(module.dilation),
        groups=module.groups,
        has_bias=has_bias,
    )


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def resolve_disabled(layer_names: list[str], disable_names: tuple[str, ...], quantize_first_last: bool) -> set[str]:
    """Names kept in float (DESIGN.md §4).

    Entries are exact layer names or glob patterns (`"blocks.0.*"`, `fnmatch` rules).
    Empty `disable_names` keeps the first and last quantizable layer in float, as
    msModelSlim does, unless `quantize_first_last`. A name or pattern that matches no
    layer is an error that lists the nearest layer names.
    """
    disabled: set[str] = set()
    for entry in disable_names:
        matches = fnmatch.filter(layer_names, entry) if _is_pattern(entry) else [n for n in layer_names if n == entry]
        if not matches:
            near = difflib.get_close_matches(entry, layer_names, n=5, cutoff=0.4)
            hint = f"nearest layer names: {near}" if near else f"quantizable layers start with {layer_names[:5]}"
            kind = "pattern" if _is_pattern(entry) else "entry"
            raise LayerNameError(f"QuantConfig.disable_names {kind} {entry!r} matches no quantizable layer; {hint}")
        disabled.update(matches)
    if disable_names or quantize_first_last or not layer_names:
        return disabled
    return {layer_names[0], layer_names[-1]}


def module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
