"""Layers whose weight is consumed outside their own module call.

`nn.MultiheadAttention` never calls its `out_proj` as a module and keeps its input
projection as a bare `in_proj_weight`; user code may call `F.linear(x, fc.weight)` or
tie weights. A forward pre-hook cannot see those inputs. `FunctionalTaps` is a
`TorchFunctionMode` active while the model runs: at every `linear`/`conv` call whose
weight argument *is* (same object) a tapped layer's weight, it hands the activation
operand to the layer (`LayerQuantizer.on_input`: capture, then fake quant). Under the
mode torch's fused transformer fast paths are off (they bypass the submodules), so
quantized attention computes what its modules describe.

For `F.multi_head_attention_forward` the input projection's operands are the query,
key and value; the output projection's operand is produced inside the function, so the
function runs with an identity output projection (`x·I = x` exactly) and the real one
is applied to the fake-quantized result here.

`UseRecorder` finds which layers need this, in preparation's probe forward (`bridge.inplace.probe`).
"""

from __future__ import annotations

import contextlib

import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


_LINEAR_CONV = {F.linear, torch._C._nn.linear, F.conv1d, F.conv2d, torch.conv1d, torch.conv2d}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
# modules whose forward may take a fused path that skips their submodules
_FUSED_PATH_OWNERS = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoderLayer,
    nn.TransformerDecoder,
    nn.Transformer,
)


def _weight_arg(args, kwargs):
    return args[1] if len(args) > 1 else kwargs.get("weight")


class _WeightIndex:
    """Identity map from weight tensors to their layer (weak: a freed tensor's id is never confused)."""

    def __init__(self):
        self._by_id: dict[int, tuple[weakref.ref, object]] = {}

    def note(self, tensor: torch.Tensor, layer) -> None:
        self._by_id[id(tensor)] = (weakref.ref(tensor), layer)

    def get(self, tensor):
        entry = self._by_id.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def clear(self) -> None:
        self._by_id.clear()


class FunctionalTaps(TorchFunctionMode):
    """Routes the activation operand of every functional use of a tapped layer's weight
    through that layer (`on_input`). Entered by forward pre-hooks on the model and on the
    modules with fused paths, left by their forward hooks (nested entries count)."""

    def __init__(self, layers: list):
        super().__init__()
        self.layers = layers
        self.index = _WeightIndex()
        self._depth = 0
        self._active = False
        self._handles: list = []
        for layer in layers:
            layer.weight_watch = lambda w, layer=layer: self.index.note(w, layer)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_CONV:
            layer = self.index.get(_weight_arg(args, kwargs))
            if layer is not None:
                if args:
                    args = (layer.on_input(args[0]), *args[1:])
                else:
                    kwargs = {**kwargs, "input": layer.on_input(kwargs["input"])}
        elif func is F.multi_head_attention_forward:
            return self._attention(func, args, kwargs)
        return func(*args, **kwargs)

    def _attention(self, func, args, kwargs):
        a = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
        projection = self.index.get(a.get("in_proj_weight"))
        if projection is not None:
            q, k, v = a["query"], a["key"], a["value"]
            q2 = projection.on_input(q)
            k2 = q2 if k is q else projection.on_input(k)
            v2 = k2 if v is k else q2 if v is q else projection.on_input(v)
            a["query"], a["key"], a["value"] = q2, k2, v2
        out = self.index.get(a.get("out_proj_weight"))
        if out is None:
            return func(**a)
        w, b = a["out_proj_weight"], a["out_proj_bias"]
        a["out_proj_weight"] = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        a["out_proj_bias"] = None
        attn, weights = func(**a)
        return F.linear(out.on_input(attn), w, b), weights

    # -- entering and leaving with the model's forward ------------------------------------
    def _enter(self, *_):
        if self._depth == 0:
            # only when a tapped layer quantizes, is captured or probed: otherwise the model takes
            # torch's own paths (the fused attention fast path), exactly as the float model does
            self._active = any(
                layer.quant_enabled or layer.listeners or layer.probe is not None for layer in self.layers
            )
            if self._active:
                self.__enter__()
        self._depth += 1

    def _leave(self, *_):
        self._depth -= 1
        if self._depth == 0:
            if self._active:
                self.__exit__(None, None, None)
            self.index.clear()

    def install(self, model: nn.Module) -> "FunctionalTaps":
        owners = [model] + [m for m in model.modules() if isinstance(m, _FUSED_PATH_OWNERS) and m is not model]
        for m in owners:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave, always_call=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self.layers:
            layer.weight_watch = None


@contextlib.contextmanager
def one_attention_path():
    """torch's fused attention fast path off for the forwards inside: the float and the
    quantized forwards then compute every position alike (the fast path writes 0 at padded
    positions, the tapped quantized path does not), so comparisons measure quantization."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def fused_path_layers(model: nn.Module, layers: dict[str, nn.Module]) -> set[str]:
    """Layers that attention computes functionally: every `nn.MultiheadAttention`'s input
    projection (the module itself) and its `out_proj`."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out.update(n for n in (name, f"{name}.out_proj" if name else "out_proj") if n in layers)
    return out


class _UseCounter(TorchFunctionMode):
    def __init__(self, weights: dict[int, str]):
        super().__init__()
        self.weights, self.uses = weights, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_CONV:
            name = self.weights.get(id(_weight_arg(args, kwargs)))
            if name is not None:
                self.uses[name] = self.uses.get(name, 0) + 1
        return func(*args, **kwargs)


class UseRecorder:
    """Counts, in one forward, each plain layer's module calls and the functional calls that
    take its weight: `hooks` (pre-hooks) and `mode` (a `TorchFunctionMode` to enter)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.attention = fused_path_layers(model, layers)
        plain = {n: m for n, m in layers.items() if n not in self.attention}
        self.calls = dict.fromkeys(plain, 0)
        self.mode = _UseCounter({id(m.weight): n for n, m in plain.items()})
        self.handles = [m.register_forward_pre_hook(self._count(n)) for n, m in plain.items()]

    def _count(self, name):
        def hook(*_):
            self.calls[name] += 1

        return hook

    def functional(self) -> set[str]:
        """Attention's projections and the layers whose weight entered more functional calls than the module ran."""
        return self.attention | {n for n, uses in self.mode.uses.items() if uses > self.calls[n]}
