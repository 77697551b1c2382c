"""In-place fake quantization of one layer: `LayerQuantizer`.

The user's module stays where it is, with its class, attributes and `forward`
(numerics: `jaxq.numerics`, `x̂ = (q − o)·s`):

- its weight parameter becomes a `torch.nn.utils.parametrize` parametrization `W ↦ Ŵ`
  (the float original stays under `module.parametrizations.<weight>.original`), so any
  code that reads `module.weight` — its own forward, `F.linear(x, fc.weight)`, tied
  weights, torch's fused transformer paths — gets `Ŵ`;
- its input is fake-quantized by a forward pre-hook (positional or keyword input); a
  layer whose weight is used outside its own call (`nn.MultiheadAttention`) is tapped
  at the functional call instead (`bridge.inplace.functional`);
- msModelSlim's buffers `input_scale`, `input_offset`, `weight_scale`, `weight_offset`
  live on the module itself;
- with SmoothQuant factors `s` (`jaxq.smoothing`) the quantizers see `x / s` and
  `W·diag(s)`: `Q(x / s)·Q(W·diag(s))ᵀ ≈ x·Wᵀ`; with quantization off the layer is float.
  `s` scales the input channels: a Linear's last axis, a pointwise convolution's channel
  axis (`along_channels`).

`detach()` undoes all of it and leaves the module exactly as it was. Only
`bridge.inplace.record.apply_records` writes the buffers (one parameter record).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from jaxq import QScheme

MARKER = "_jaxq_quantizer"
_last_smoothed: list = [None]  # (x, its version, s, x / s) of the last smoothed input
BUFFERS = ("weight_scale", "weight_offset", "input_scale", "input_offset", "bias_correction")
DELTA = "bias_correction"  # buffer of δ: in the state_dict, so a saved quantized model keeps it


def along_channels(s, weight_ndim: int):
    """SmoothQuant factors `s [in]` shaped to broadcast over a weight's input channels and
    over the layer's input alike: `[in]` for a Linear (`W [out, in]`, `x [..., in]`),
    `[in, 1, 1]` for a 2-D convolution (`W [out, in, 1, 1]`, `x [N, in, H, W]`). Torch,
    NumPy and JAX arrays."""
    return s.reshape((-1,) + (1,) * (weight_ndim - 2))


def pointwise(weight_shape: tuple[int, ...], groups: int = 1) -> bool:
    """A Linear weight's shape, or an ungrouped convolution's with a 1×1 kernel: what
    SmoothQuant scales (each output is a product of one input position's channels with `W`)."""
    return len(weight_shape) == 2 or (len(weight_shape) >= 3 and groups == 1 and all(k == 1 for k in weight_shape[2:]))


class _Owned(nn.Module):
    """A parametrization reading its `LayerQuantizer`'s state (kept out of the module tree)."""

    def __init__(self, owner: "LayerQuantizer"):
        super().__init__()
        self.__dict__["owner"] = owner


class _FakeQuantWeight(_Owned):
    """`W ↦ Ŵ` while quantization is on (stored codes when a rounding algorithm chose them)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        owner = self.__dict__["owner"]
        if owner.probe is not None:
            out = w + owner.probe * (owner.unsmoothed(owner.quantized_weight(w)) - w).detach()
        elif not owner.quant_enabled:
            out = w
        else:
            out = owner.quantized_weight(w)
        owner.note_weight(out)
        return out


class _CorrectedBias(_Owned):
    """`b ↦ b + δ` (bias correction) while quantization is on."""

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        owner = self.__dict__["owner"]
        delta = owner.module._buffers.get(DELTA)
        if owner.probe is not None and delta is not None:
            return b + owner.probe * delta
        if not owner.quant_enabled or delta is None:
            return b
        return (b.float() + delta).to(b.dtype)  # δ = 0 (none set) leaves b as it is


class QuantizerConflictError(ValueError):
    """The module already carries jaxq quantizers or attributes named like its buffers."""


class LayerQuantizer:
    """Fake quantization of `module`'s weight `param` (and input, with `act_scheme`), in place.

    Args:
      module: the layer (`nn.Linear`, `nn.Conv1d/2d` or `nn.MultiheadAttention`).
      name: its name in the model (the first one, if it is reachable under several).
      weight_scheme / act_scheme: the quantizers (`act_scheme=None`: weight-only).
      param: the weight parameter's name (`"in_proj_weight"` for attention).
      functional: tap the input at the functional call (`bridge.inplace.functional`) instead of
        with a forward pre-hook.
      weight_group: input columns per weight scale of a 2-D weight (`QuantConfig.w_group_size`):
        `weight_scale` / `weight_offset` are then `[out, in/g]` (`jaxq.groupwise`); None: `[out]`.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        weight_scheme: QScheme,
        act_scheme: QScheme | None,
        param: str = "weight",
        functional: bool = False,
        weight_group: int | None = None,
    ):
        if getattr(module, MARKER, None) is not None:
            raise QuantizerConflictError(
                f"layer {name!r} already carries a jaxq quantizer; call restore() on the "
                "Calibrator that made it, or start from a fresh model"
            )
        taken = [b for b in BUFFERS if b in dir(module)]
        if taken:
            raise QuantizerConflictError(
                f"layer {name!r} ({type(module).__name__}) already has attributes {taken}; "
                "jaxq stores its buffers under these names — keep it float (disable_names)"
            )
        self.module, self.name, self.param = module, name, param
        self.bias_param = "in_proj_bias" if param == "in_proj_weight" else "bias"
        self.weight_scheme, self.act_scheme, self.functional = weight_scheme, act_scheme, functional
        self.quant_enabled = False
        self.probe: torch.Tensor | None = None  # ε of a functionally tapped layer under `probing`; None = off
        self.weight_codes: torch.Tensor | None = None  # codes chosen by SQuant / AdaRound; None = nearest
        self.smoothing: torch.Tensor | None = None  # SmoothQuant factors s [in]; None = none
        self.listeners: list[Callable[[torch.Tensor], None]] = []
        self.weight_watch: Callable[[torch.Tensor], None] | None = None
        self.recorded_weight: tuple | None = (
            None  # stamp of the weight its record was made from (bridge.inplace.record)
        )
        self._added_bias = False
        self._input_qparams = (1.0, 0)  # Python copy of (input_scale, input_offset), see fake_quant_input
        self._param_order = list(module._parameters)  # restored by detach (state_dict key order)
        weight = getattr(module, param)
        out, device = weight.shape[0], weight.device
        self.weight_ndim = weight.dim()  # 2: Linear; 3–4: Conv1d/2d (`along_channels`)
        if weight_group is not None and (weight.dim() != 2 or weight.shape[1] % weight_group):
            raise ValueError(
                f"layer {name!r}: weight groups of {weight_group} columns need a 2-D weight whose width they "
                f"divide, got {tuple(weight.shape)}"
            )
        self.weight_group = weight_group
        qshape = (out,) if weight_group is None else (out, weight.shape[1] // weight_group)
        self._class = type(module)
        if parametrize.is_parametrized(module):  # the user's own: torch would add our properties to their class
            module.__class__ = type(self._class.__name__, (self._class,), {})
        module.register_buffer("weight_scale", torch.ones(qshape, dtype=torch.float32, device=device))
        module.register_buffer("weight_offset", torch.zeros(qshape, dtype=torch.int32, device=device))
        if act_scheme is not None:
            module.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
            module.register_buffer("input_offset", torch.zeros((), dtype=torch.int32, device=device))
        parametrize.register_parametrization(module, param, _FakeQuantWeight(self), unsafe=True)
        if not functional:
            module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        module.register_load_state_dict_post_hook(self._after_load)
        module.__dict__[MARKER] = self
        module.__dict__["__prepare_scriptable__"] = self._refuse_script

    # -- state -------------------------------------------------------------------------
    @property
    def act_quant(self) -> bool:
        return self.act_scheme is not None

    weight_scale = property(lambda self: self.module.weight_scale)
    weight_offset = property(lambda self: self.module.weight_offset)
    input_scale = property(lambda self: self.module.input_scale)
    input_offset = property(lambda self: self.module.input_offset)

    def set_qparams(self, weight_scale, weight_offset, input_scale=None, input_offset=None) -> None:
        """Copy parameters into the module's buffers (no aliasing). Called by `bridge.inplace.record` only."""
        m = self.module
        with torch.no_grad():
            m.weight_scale.copy_(torch.as_tensor(weight_scale).reshape(m.weight_scale.shape))
            m.weight_offset.copy_(torch.as_tensor(weight_offset).reshape(m.weight_offset.shape))
            if self.act_quant:
                m.input_scale.copy_(torch.as_tensor(input_scale).reshape(()))
                m.input_offset.copy_(torch.as_tensor(input_offset).reshape(()))
        self._sync_input_qparams()

    def _sync_input_qparams(self) -> None:
        if self.act_quant:
            self._input_qparams = (float(self.module.input_scale), int(self.module.input_offset))

    def _after_load(self, _module, _keys) -> None:
        self._sync_input_qparams()

    def set_weight_codes(self, codes) -> None:
        """Simulate these integer codes `q` (`Ŵ = (q − o)·s`); None: round to nearest."""
        if codes is None:
            self.weight_codes = None
            return
        codes = torch.as_tensor(codes).to(device=self.weight_scale.device, dtype=torch.int32)
        if codes.shape != self.float_weight.shape:
            raise ValueError(
                f"layer {self.name!r}: weight codes of shape {tuple(codes.shape)} do not match the "
                f"weight {tuple(self.float_weight.shape)}"
            )
        self.weight_codes = codes.clone()

    @property
    def bias_correction(self) -> torch.Tensor | None:
        """`δ` (`[out]`), or None when none is set (no buffer, or all zero)."""
        delta = self.module._buffers.get(DELTA)
        return None if delta is None or not bool(delta.any()) else delta

    def set_bias_correction(self, delta) -> None:
        """Add `δ` (`[out]`) to the bias while quantization is on; None removes it. A
        layer without a bias gets a zero bias to carry `δ` (removed by `detach`)."""
        m = self.module
        if delta is None:
            if DELTA in m._buffers:
                with torch.no_grad():
                    m._buffers[DELTA].zero_()
            return
        delta = torch.as_tensor(delta).to(device=self.weight_scale.device, dtype=torch.float32).reshape(-1)
        if delta.numel() != self.weight_scale.shape[0]:
            raise ValueError(
                f"layer {self.name!r}: bias correction of {delta.numel()} values does not match "
                f"{self.weight_scale.shape[0]} output channels"
            )
        if not torch.isfinite(delta).all():
            raise FloatingPointError(f"layer {self.name!r}: bias correction is not finite")
        self.carry_bias_correction()
        with torch.no_grad():
            m._buffers[DELTA].copy_(delta)

    def carry_bias_correction(self) -> None:
        """Give the bias its `b ↦ b + δ` parametrization now (δ none yet), so a model's
        `state_dict` has the same keys before and after calibration. A layer without a
        bias gets a zero bias (removed by `detach`)."""
        m = self.module
        if _ours(m, self.bias_param) is not None:
            return
        out = self.weight_scale.shape[0]
        m.register_buffer(DELTA, torch.zeros(out, dtype=torch.float32, device=self.weight_scale.device))
        if getattr(m, self.bias_param) is None:
            w = self.original_weight
            setattr(
                m,
                self.bias_param,
                nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False),
            )
            self._added_bias = True
        parametrize.register_parametrization(m, self.bias_param, _CorrectedBias(self), unsafe=True)

    def set_smoothing(self, factors) -> None:
        """Divide the input by `s` (`[in]`) and multiply the weight's input channels by it
        (`jaxq.smoothing`); None removes it. Linear layers and pointwise convolutions tapped
        by a hook only (`pointwise`)."""
        if factors is None:
            self.smoothing = None
            return
        w = self.original_weight
        groups = getattr(self.module, "groups", 1)
        if not pointwise(tuple(w.shape), groups) or self.functional or self.act_scheme is None:
            raise ValueError(
                f"layer {self.name!r}: SmoothQuant factors need a Linear layer or an ungrouped 1×1 "
                f"convolution with a quantized input (weight {tuple(w.shape)}, "
                f"groups={groups}, functional={self.functional}, "
                f"input quantized={self.act_scheme is not None})"
            )
        factors = torch.as_tensor(factors).to(device=w.device, dtype=torch.float32).reshape(-1)
        if factors.numel() != w.shape[1]:
            raise ValueError(
                f"layer {self.name!r}: {factors.numel()} smoothing factors for {w.shape[1]} input channels"
            )
        if not (torch.isfinite(factors).all() and (factors > 0).all()):
            raise ValueError(f"layer {self.name!r}: smoothing factors must be finite and positive")
        self.smoothing = factors.clone()

    def smoothed_weight(self, w: torch.Tensor) -> torch.Tensor:
        """`W·diag(s)` (float32), or `W` without smoothing."""
        return w if self.smoothing is None else w.float() * self._factors(w.dim())

    def _factors(self, weight_ndim: int) -> torch.Tensor:
        return along_channels(self.smoothing, weight_ndim)

    def unsmoothed(self, w: torch.Tensor) -> torch.Tensor:
        """`W·diag(1/s)`: a weight in the quantizer's coordinates back in the layer's."""
        return w if self.smoothing is None else w / self._factors(w.dim())

    def quantized_weight(self, w: torch.Tensor) -> torch.Tensor:
        """`Ŵ` of the original weight `w`, in the quantizer's coordinates (`W·diag(s)` with
        SmoothQuant): the stored codes if a rounding algorithm chose them, else nearest."""
        scheme = self.weight_scheme
        source = self.smoothed_weight(w.float()) if self.weight_codes is None else self.dequantized_codes()
        # float32 scales whatever `model.half()` / `.double()` made of the buffers
        scale, offset = self.weight_scale.float(), self.weight_offset.int()
        if self.weight_group is None:  # the exported graph keeps one per-channel QDQ pair on the weight
            return torch.fake_quantize_per_channel_affine(
                source.float(), scale, offset, 0, scheme.qmin, scheme.qmax
            ).to(w.dtype)
        rows = source.float().reshape(scale.numel(), -1)  # a group is a channel of the [out·in/g, g] rows
        out = torch.fake_quantize_per_channel_affine(
            rows, scale.reshape(-1), offset.reshape(-1), 0, scheme.qmin, scheme.qmax
        )
        return out.reshape(source.shape).to(w.dtype)

    def smoothed_input(self, x):
        """`x / s` along the input channels (x itself without smoothing or for non-float values).

        Layers of one group read the same `x` with equal `s`: they get the same tensor
        object, so capture shares their observer update as it does without smoothing."""
        if self.smoothing is None or not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return x
        last = _last_smoothed[0]
        if last is not None and last[0] is x and last[1] == x._version and torch.equal(last[2], self.smoothing):
            return last[3]
        out = (x.float() / self._factors(self.weight_ndim)).to(x.dtype)
        _last_smoothed[0] = (x, x._version, self.smoothing, out)
        return out

    @property
    def original_weight(self) -> torch.Tensor:
        """The model's own float weight (the fake quantizer's input): the Parameter, or
        the output of the user's own parametrizations (`weight_norm`, …) under ours."""
        return _input_of_ours(self.module, self.param)

    @property
    def float_weight(self) -> torch.Tensor:
        """The float weight the weight quantizer sees: the original, times `diag(s)` with SmoothQuant."""
        return self.smoothed_weight(self.original_weight)

    @property
    def float_bias(self) -> torch.Tensor | None:
        """The original bias (None if the layer has none)."""
        if parametrize.is_parametrized(self.module, self.bias_param):
            return None if self._added_bias else _input_of_ours(self.module, self.bias_param)
        return getattr(self.module, self.bias_param)

    def corrected_bias(self) -> torch.Tensor | None:
        """The bias of the quantized layer, `b + δ` (whether quantization is on or off)."""
        b = self.float_bias
        if self.bias_correction is None:
            return b
        return self.bias_correction.clone() if b is None else b.detach().float() + self.bias_correction

    def dequantized_codes(self) -> torch.Tensor:
        """`(q − o)·s` of the stored codes: fake-quantizing it returns it unchanged, so
        exported graphs keep their weight QuantizeLinear/DequantizeLinear pair."""
        if self.weight_group is None:
            shape = (-1,) + (1,) * (self.weight_codes.dim() - 1)
            offset, scale = self.weight_offset.reshape(shape), self.weight_scale.float().reshape(shape)
            return (self.weight_codes - offset).float() * scale
        codes = self.weight_codes.reshape(self.weight_scale.numel(), -1)  # a row per group
        offset, scale = self.weight_offset.reshape(-1, 1), self.weight_scale.float().reshape(-1, 1)
        return ((codes - offset).float() * scale).reshape(self.weight_codes.shape)

    def fake_quant_weight(self) -> torch.Tensor:
        """`Ŵ` (the float weight when quantization is off)."""
        return getattr(self.module, self.param)

    def note_weight(self, w: torch.Tensor) -> None:
        if self.weight_watch is not None:
            self.weight_watch(w)

    # -- input -------------------------------------------------------------------------
    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as the layer consumes it: listeners (capture) see the float
        input of the quantizer (`x / s` with SmoothQuant); with quantization on it is
        fake-quantized."""
        seen = self.smoothed_input(x)
        for listen in self.listeners:
            listen(seen)
        if not (self.act_quant and isinstance(x, torch.Tensor) and x.is_floating_point()):
            return x
        if self.probe is not None:
            back = self.fake_quant_input(seen.detach()).float()
            back = back if self.smoothing is None else back * self._factors(self.weight_ndim)
            return x + self.probe * (back.to(x.dtype) - x.detach())
        return self.fake_quant_input(seen) if self.quant_enabled else x

    def _pre_hook(self, _module, args, kwargs):
        if args:
            x = args[0]
            xq = self.on_input(x)
            return None if xq is x else ((xq, *args[1:]), kwargs)
        if kwargs:
            key = "input" if "input" in kwargs else next(iter(kwargs))
            x = kwargs[key]
            xq = self.on_input(x)
            return None if xq is x else (args, {**kwargs, key: xq})
        return None

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act_scheme
        scale, offset = self._input_qparams
        if _eager_cpu_inference(x):
            xq = fake_quant_per_tensor_cpu(x.float(), scale, offset, s.qmin, s.qmax)
        else:
            # Python numbers, not the buffers: the float-qparams op has the meta kernels that
            # torch.export needs for dynamic shapes (the tensor-qparams one has none).
            xq = torch.fake_quantize_per_tensor_affine(x.float(), scale, offset, s.qmin, s.qmax)
        return xq.to(x.dtype)

    def _refuse_script(self):
        raise TypeError(
            f"torch.jit.script cannot compile layer {self.name!r}: it carries a jaxq fake quantizer (a torch "
            "parametrization and hooks, which TorchScript does not support). Use torch.export or "
            "Calibrator.export_quant_onnx for a graph, export_param + bridge.load_quantized to save it"
        )

    # -- undo --------------------------------------------------------------------------
    def detach(self) -> nn.Module:
        """Remove every trace of quantization: the module is as it was before (its class,
        its Parameters, the user's own parametrizations). A deep copy of a quantized module
        is detached the same way; no class is edited, so copies stay independent."""
        m = self.module
        remove_hooks_of(m, LayerQuantizer, self)
        for name in (self.param, self.bias_param):
            _remove_ours(m, name)
        m.__class__ = self._class
        if self._added_bias:
            setattr(m, self.bias_param, None)
            self._added_bias = False
        for key in BUFFERS:
            m._buffers.pop(key, None)
        order = {k: i for i, k in enumerate(self._param_order)}
        items = sorted(m._parameters.items(), key=lambda kv: order.get(kv[0], len(order)))
        m._parameters.clear()
        m._parameters.update(items)
        m.__dict__.pop(MARKER, None)
        m.__dict__.pop("__prepare_scriptable__", None)
        self.smoothing = None
        return m

    def extra_repr(self) -> str:
        a = "float" if self.act_scheme is None else f"int{self.act_scheme.bits}"
        smooth = ", smoothed" if self.smoothing is not None else ""
        grid = "per-channel" if self.weight_group is None else f"groups of {self.weight_group}"
        return f"w=int{self.weight_scheme.bits} {grid}, a={a}{smooth}, enabled={self.quant_enabled}"

    def __repr__(self) -> str:
        return f"LayerQuantizer({self.name!r}, {self.extra_repr()})"


def set_quantization(quantizers: dict, enabled) -> None:
    """Switch fake quantization of `quantizers` on or off: `enabled` a bool, or a function
    of the layer name. The one place `quant_enabled` is written after construction."""
    for name, q in quantizers.items():
        q.quant_enabled = bool(enabled(name)) if callable(enabled) else bool(enabled)


@contextlib.contextmanager
def quantization(quantizers: dict, enabled=True):
    """Context manager: `set_quantization(quantizers, enabled)` inside, each layer's previous
    state after (also on error)."""
    before = {n: q.quant_enabled for n, q in quantizers.items()}
    set_quantization(quantizers, enabled)
    try:
        yield
    finally:
        set_quantization(quantizers, before.__getitem__)


@contextlib.contextmanager
def probing(quantizers: dict, eps: torch.Tensor):
    """Context manager: every layer's quantization error enters the float model scaled by
    its own `ε` (`eps`, `[layers, rows]`, zeros), so `∂(output)/∂ε` is the output change that
    quantizing that layer alone causes, to first order (`bridge.studies.sensitivity.fisher_sensitivity`).

    A module layer's output `y` becomes `y + ε·(y_q − y)`, `y_q` its output with its own
    quantization on; with one ε per batch row when `y`'s first axis has `rows` entries
    (`ε[i, 0]` for the whole output otherwise). A layer tapped at its functional call has
    no output of its own: `W + ε·(Ŵ − W)`, `x + ε·(x̂ − x)`, `b + ε·δ` with `ε = ε[i, 0]`."""
    if eps.dim() != 2 or eps.shape[0] != len(quantizers):
        raise ValueError(f"probing needs eps of shape [{len(quantizers)}, rows], got {tuple(eps.shape)}")
    rows, busy, handles = eps.shape[1], [False], []

    def output_probe(name, q, e):
        def hook(module, args, kwargs, out):
            if busy[0] or not (isinstance(out, torch.Tensor) and out.is_floating_point()):
                return None
            busy[0] = True
            try:
                with quantization({name: q}, True), torch.no_grad():
                    quantized = module(*args, **kwargs)
            finally:
                busy[0] = False
            per_row = rows > 1 and out.dim() > 0 and out.shape[0] == rows
            scale = e.reshape((rows,) + (1,) * (out.dim() - 1)) if per_row else e[0]
            return torch.addcmul(out, scale.to(out.dtype), quantized.sub_(out.detach()))

        return hook

    try:
        with quantization(quantizers, False):
            for i, (name, q) in enumerate(quantizers.items()):
                if q.functional:
                    q.probe = eps[i, 0]
                else:
                    handles.append(q.module.register_forward_hook(output_probe(name, q, eps[i]), with_kwargs=True))
            yield
    finally:
        for h in handles:
            h.remove()
        for q in quantizers.values():
            q.probe = None


def quantizer_of(module: nn.Module) -> LayerQuantizer | None:
    return module.__dict__.get(MARKER)


def model_quantizers(model: nn.Module) -> dict[str, LayerQuantizer]:
    """Every jaxq quantizer in `model`, by layer name, in module order."""
    out: dict[str, LayerQuantizer] = {}
    for _name, m in model.named_modules():
        q = quantizer_of(m)
        if q is not None:
            out[q.name] = q
    return out


def _ours(module: nn.Module, name: str) -> int | None:
    """Index of jaxq's parametrization in `module.parametrizations[name]` (None: none).
    By type, so a deep copy's (a copy of ours) is found too."""
    if not parametrize.is_parametrized(module, name):
        return None
    for i, p in enumerate(module.parametrizations[name]):
        if isinstance(p, _Owned):
            return i
    return None


def has_ours(module: nn.Module, name: str) -> bool:
    """Whether `module`'s tensor `name` carries jaxq's parametrization."""
    return _ours(module, name) is not None


def _input_of_ours(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor jaxq's parametrization of `name` receives: the original Parameter, or
    what the user's parametrizations before it make of their originals."""
    plist = module.parametrizations[name]
    index = _ours(module, name)
    if index == 0 and plist.is_tensor:
        return plist.original
    x = (
        plist[0](plist.original)
        if plist.is_tensor
        else plist[0](*(getattr(plist, f"original{i}") for i in range(plist.ntensors)))
    )
    for i in range(1, index):
        x = plist[i](x)
    return x


def _remove_ours(module: nn.Module, name: str) -> None:
    """Remove jaxq's parametrization of `name`, leaving the user's own in place. Never
    edits the parametrized class (shared with deep copies of the module): the module
    gets its original Parameter; `detach` gives it its class back."""
    index = _ours(module, name)
    if index is None:
        return
    plist = module.parametrizations[name]
    if len(plist) > 1:
        del plist[index]
        return
    original = plist.original
    del module.parametrizations[name]
    if isinstance(original, nn.Parameter):
        module._parameters[name] = original
    else:
        module._buffers[name] = original
    if not len(module.parametrizations):
        del module._modules["parametrizations"]


def remove_hooks_of(module: nn.Module, owner_type: type, owner=None) -> None:
    """Remove every hook of `module` that is a method of `owner` (or of any `owner_type`).

    By owner, not by handle: a deep copy of the module shares the handles' references to
    the original's hook dicts."""
    for attr, hooks in list(vars(module).items()):
        if not (attr.endswith("hooks") and isinstance(hooks, dict)):
            continue
        for key, fn in list(hooks.items()):
            bound = getattr(fn, "__self__", None)
            if isinstance(bound, owner_type) and (owner is None or bound is owner):
                del hooks[key]
                for extra in (
                    "_forward_pre_hooks_with_kwargs",
                    "_forward_hooks_with_kwargs",
                    "_forward_hooks_always_called",
                ):
                    getattr(module, extra, {}).pop(key, None)


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    """A plain CPU tensor, no gradient, not being traced (export, compile, jit)."""
    return (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def fake_quant_per_tensor_cpu(x: torch.Tensor, scale: float, offset: int, qmin: int, qmax: int) -> torch.Tensor:
    """`torch.fake_quantize_per_tensor_affine` bit for bit on finite float32 input, faster
    on CPU (torch's kernel is scalar; these in-place ops are vectorised). torch computes
    `(clamp(round(x·s⁻¹) + o, qmin, qmax) − o)·s`, `s⁻¹ = 1/s` in float32, round half to
    even; adding and taking back the integer `o` is exact, so five passes give the same
    bits: `clamp(round(x·s⁻¹), qmin − o, qmax − o)·s + 0` (the `+ 0` turns the −0 that
    rounding gives small negative inputs into torch's +0). (torch maps NaN to `qmin`; this
    keeps NaN.)"""
    inv = float(np.float32(1.0) / np.float32(scale))
    y = torch.mul(x, inv)
    return y.round_().clamp_(qmin - offset, qmax - offset).mul_(scale).add_(0.0)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (setattr on its parent)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
