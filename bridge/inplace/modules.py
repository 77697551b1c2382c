"""Finding quantizable layers and describing them as `jaxq.LayerSpec`."""

from __future__ import annotations

import difflib
import fnmatch

from torch import nn

from jaxq import LayerSpec

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# layers jaxq leaves in float, with the reason it says (summary, CLI table, warning)
UNSUPPORTED = (
    (nn.Conv3d, "3-D convolution: no quantizer for Conv3d yet"),
    (nn.modules.conv._ConvTransposeNd, "transposed convolution: no quantizer for ConvTranspose yet"),
    (nn.RNNBase, "recurrent layer (LSTM/GRU/RNN): no quantizer for recurrent weights yet"),
)


class LayerNameError(ValueError):
    """A `disable_names` entry matches no quantizable layer."""


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every `nn.Linear` / `nn.Conv1d` / `nn.Conv2d` (subclasses included) and every
    `nn.MultiheadAttention` with a packed input projection (its `in_proj_weight`), in
    module order; a module reachable under several names is listed under the first."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE) or _packed_attention(module):
            out[name] = module
    return out


def _packed_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) and getattr(module, "in_proj_weight", None) is not None


def weight_name(module: nn.Module) -> str:
    """The quantized weight parameter of a layer found by `quantizable_layers`."""
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """`{name: why it stays float}` for layers with weights that jaxq does not quantize."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not _packed_attention(module):
            out[name] = "attention with separate q/k/v projection weights: not quantized yet"
            continue
        for kind, why in UNSUPPORTED:
            if isinstance(module, kind):
                out[name] = f"{type(module).__name__}: {why}"
                break
    return out


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    """The `LayerSpec` of a torch layer (its own `forward` may still do more, e.g. pad)."""
    if isinstance(module, nn.MultiheadAttention):
        return LayerSpec(name, "linear", has_bias=module.in_proj_bias is not None)
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", has_bias=has_bias)
    kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
    padding = _numeric_padding(module)
    static = getattr(module, "static_padding", None)  # TF-"same" convs that pad in forward
    if isinstance(static, (nn.ZeroPad1d, nn.ZeroPad2d)):
        pads = static.padding  # (left, right[, top, bottom]): last spatial dim first
        extra = [tuple(pads[i : i + 2]) for i in range(0, len(pads), 2)][::-1]
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


def _numeric_padding(module: nn.Module) -> list[tuple[int, int]]:
    """`(lo, hi)` per spatial dim; `'same'` pads `d·(k−1)` split as torch does (extra on the right)."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def matching_layers(layer_names: list[str], entry: str, field: str) -> list[str]:
    """The layers `entry` (a name or a glob) names; `LayerNameError` naming `field`, the
    entry and the nearest layer names when it names none."""
    matches = fnmatch.filter(layer_names, entry) if _is_pattern(entry) else [n for n in layer_names if n == entry]
    if not matches:
        near = difflib.get_close_matches(entry, layer_names, n=5, cutoff=0.4)
        hint = f"nearest layer names: {near}" if near else f"quantizable layers start with {layer_names[:5]}"
        kind = "pattern" if _is_pattern(entry) else "entry"
        raise LayerNameError(f"QuantConfig.{field} {kind} {entry!r} matches no quantizable layer; {hint}")
    return matches


def check_layer_bits(layer_names: list[str], layer_bits, field: str = "layer_bits") -> None:
    """Every pattern of `layer_bits` (or `layer_act_bits`) names at least one quantizable
    layer (else `LayerNameError`)."""
    for pattern, _bits in layer_bits:
        matching_layers(layer_names, pattern, field)


def first_and_last(layer_names: list[str], ends=None) -> list[str]:
    """The first and last layers (`ends`: `bridge.inplace.ends.Ends` from the model's data
    flow; None: the first and last in module order) — what msModelSlim keeps float by default."""
    if not layer_names:
        return []
    if ends is None:
        return list(dict.fromkeys([layer_names[0], layer_names[-1]]))
    return [n for n in layer_names if n in ends.first or n in ends.last]


def resolve_disabled(
    layer_names: list[str], disable_names: tuple[str, ...], quantize_first_last, ends=None
) -> set[str]:
    """Names kept in float (docs/design.md §4).

    Entries are exact layer names or glob patterns (`"blocks.0.*"`, `fnmatch` rules).
    Empty `disable_names` keeps the first and last layers in float, as msModelSlim does,
    unless `quantize_first_last`: those of `ends` (`bridge.inplace.ends`: the layers that
    read the model's inputs through no other quantizable layer, and those whose output
    nothing quantizable reads on its way to a model output), or the first and last in module
    order when `ends` is not known. A name or pattern that matches no layer is an error that
    lists the nearest layer names.
    """
    disabled: set[str] = set()
    for entry in disable_names:
        disabled.update(matching_layers(layer_names, entry, "disable_names"))
    if disable_names or quantize_first_last or not layer_names:
        return disabled
    return set(first_and_last(layer_names, ends))
