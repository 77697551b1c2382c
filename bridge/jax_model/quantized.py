"""The calibrated model's quantized forward in JAX (numerics: `jaxq.model_quant`).

`quantized_forward(calibrator)` lowers a float copy of the calibrated model (BN folds
kept, quantizers removed) and inserts `jaxq`'s fake quant at every quantized layer: the
weight (and bias correction) in the parameter pytree before the call, the input by a
forward pre-hook that runs inside the lowered function. Per-layer quantizer state,
enable switches and bit widths are arguments (`LayerQState`, `Switches`), so studies
that vary them — one-hot switches under `vmap`, bit allocations — compile once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from bridge.inplace.fakequant import LayerQuantizer, along_channels
from bridge.jax_model.lower import LoweredModel, LoweringError, lower, tied_parameters
from bridge.inplace.record import LayerRecord
from bridge.inplace.transaction import quantizer_free_copy
from jaxq.block_reconstruction import keep_mask
from jaxq.model_quant import LayerQState, Switches, all_on, corrected_bias, quantized_input, quantized_weight


@dataclasses.dataclass(frozen=True)
class JaxLayer:
    """A quantized layer as the JAX model sees it."""

    name: str
    index: int
    weight_key: str  # key of its weight in `params`
    bias_key: str | None  # key of its bias (None: the layer has none)
    out_axis: int  # channel axis of its output (bias correction without a bias)
    quantize_input: bool


class _Slot:
    """The traced quantizer state while the lowered function runs (hooks read it)."""

    state: dict[str, LayerQState] | None = None
    switches: Switches | None = None
    drop: tuple | None = None  # (key, keep probability): QDrop's random drop of input quantization


@dataclasses.dataclass
class QuantizedForward:
    """`fn(params, buffers, state, switches, args, kwargs)`: the quantized model in JAX.

    `state`: layer name → `LayerQState` (from the calibrator's records); `switches=None`
    means every layer as calibrated."""

    lowered: LoweredModel
    layers: list[JaxLayer]
    state: dict[str, LayerQState]
    fn: Callable = dataclasses.field(init=False)
    programs: dict = dataclasses.field(default_factory=dict, repr=False)  # jitted studies, see bridge.jax_model.studies
    float_weights: dict = dataclasses.field(
        default_factory=dict, repr=False
    )  # weight key → float weight (before chosen codes)
    weight_scheme: dict = dataclasses.field(default_factory=dict, repr=False)  # layer name → its calibrated QScheme
    smoothing: dict = dataclasses.field(default_factory=dict, repr=False)  # layer → SmoothQuant `along_channels`
    weight_groups: dict = dataclasses.field(default_factory=dict, repr=False)  # layer → columns per weight scale

    def __post_init__(self):
        self.fn = _make_fn(self.lowered, self.layers, self.smoothing)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def default_switches(self) -> Switches:
        return all_on(len(self.layers), [1.0 if layer.quantize_input else 0.0 for layer in self.layers])

    def __call__(self, *args, **kwargs):
        lw = self.lowered
        return self.fn(lw.params, lw.buffers, self.state, self.default_switches(), args, kwargs)


def _make_fn(lowered: LoweredModel, layers: list[JaxLayer], smoothing: dict) -> Callable:
    slot = _Slot()
    _install_hooks(lowered.module, layers, slot, smoothing)

    def fn(params, buffers, state, switches, args=(), kwargs=None, drop=None):
        """`drop=(key, p)`: every input quantizer keeps its quantized value with
        probability `p` per element and passes the float value otherwise (QDrop)."""
        switches = switches if switches is not None else all_on(len(layers))
        p = dict(params)
        for layer in layers:
            s, on = state[layer.name], switches.weight[layer.index]
            p[layer.weight_key] = quantized_weight(p[layer.weight_key], s, on)
            if layer.bias_key is not None:
                p[layer.bias_key] = corrected_bias(p[layer.bias_key], s, on)
        slot.state, slot.switches, slot.drop = state, switches, drop
        try:
            return lowered.fn(p, buffers, args, kwargs)
        finally:
            slot.state = slot.switches = slot.drop = None

    return fn


def _install_hooks(module: nn.Module, layers: list[JaxLayer], slot: _Slot, smoothing: dict) -> None:
    """`smoothing`: layer → SmoothQuant factors `s`: its input is `x / s` (the weight in
    `params` is already `W·diag(s)`), quantized or not, so the layer computes `x·Wᵀ` when off."""
    from torchax import interop

    def pre_hook(layer):
        def hook(_m, args, kwargs):
            if slot.state is None or not layer.quantize_input:
                return None
            s, on = slot.state[layer.name], slot.switches.input[layer.index]

            def quant(t):
                x = interop.jax_view(t)
                if layer.name in smoothing:
                    x = (x.astype(jnp.float32) / smoothing[layer.name]).astype(x.dtype)
                xq = quantized_input(x, s, on)
                if slot.drop is not None:
                    key, keep = slot.drop
                    xq = jnp.where(keep_mask(jax.random.fold_in(key, layer.index), keep, x.shape), xq, x)
                return interop.torch_view(xq)

            if args:
                return (quant(args[0]), *args[1:]), kwargs
            if kwargs:
                key = "input" if "input" in kwargs else next(iter(kwargs))
                return args, {**kwargs, key: quant(kwargs[key])}
            return None

        return hook

    def bias_hook(layer):
        """Bias correction of a layer without a bias: `y + δ` along its output channels."""

        def hook(_m, _args, out):
            if slot.state is None:
                return None
            s, on = slot.state[layer.name], slot.switches.weight[layer.index]
            y = interop.jax_view(out)
            shape = [1] * y.ndim
            shape[layer.out_axis % y.ndim] = -1
            delta = jnp.where(on > 0, s.bias_delta, 0.0).reshape(shape).astype(y.dtype)
            return interop.torch_view(y + delta)

        return hook

    for layer in layers:
        m = module.get_submodule(layer.name)
        m.register_forward_pre_hook(pre_hook(layer), with_kwargs=True)
        if layer.bias_key is None:
            m.register_forward_hook(bias_hook(layer))


def weight_grid(v, q: LayerQuantizer, shape) -> np.ndarray:
    """A record's weight scale or offset as it broadcasts over a weight of `shape`: per
    channel `[out, 1, …]`; per group of columns `[out, in/g]` repeated to `[out, in]`."""
    v = np.asarray(v, np.float32)
    if q.weight_group is not None:
        return np.repeat(v.reshape(shape[0], -1), q.weight_group, axis=1)
    return v.reshape((-1,) + (1,) * (len(shape) - 1))


def layer_state(record: LayerRecord | None, q: LayerQuantizer) -> LayerQState:
    """A layer's `LayerQState` from its record (None: not calibrated → scale 1, switched off by the caller)."""
    ws, a = q.weight_scheme, q.act_scheme
    out = q.float_weight.shape[0]
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float32))  # noqa: E731
    if record is None:
        w_scale, w_offset, delta = np.ones(out), np.zeros(out), np.zeros(out)
        a_scale, a_offset = 1.0, 0.0
    else:
        w_scale, w_offset = record.weight_scale, record.weight_offset
        delta = record.bias_correction if record.bias_correction is not None else np.zeros(out)
        a_scale = record.input_scale if record.input_scale is not None else 1.0
        a_offset = record.input_offset if record.input_offset is not None else 0.0
    a_grid = (a.qmin, a.qmax) if a is not None else (-128, 127)
    if q.weight_group is not None and record is not None:  # one value per weight element
        shape = tuple(q.float_weight.shape)
        w_scale, w_offset = weight_grid(w_scale, q, shape), weight_grid(w_offset, q, shape)
    return LayerQState(
        f32(w_scale),
        f32(w_offset),
        f32(ws.qmin),
        f32(ws.qmax),
        f32(a_scale).reshape(()),
        f32(a_offset).reshape(()),
        f32(a_grid[0]),
        f32(a_grid[1]),
        f32(delta),
    )


def _out_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def quantized_forward(
    model: nn.Module,
    records: dict[str, LayerRecord],
    example,
    quantized_layers: dict[str, LayerQuantizer],
) -> QuantizedForward:
    """The quantized forward of a calibrated `model` (its quantizers, `records`) as a JAX function."""
    functional = [n for n, q in quantized_layers.items() if q.functional]
    if functional:
        raise LoweringError(
            f"layers {functional[:3]} are used functionally (attention's packed projections, "
            "F.linear on a module's weight); the JAX model taps module inputs only — keep them float "
            "(disable_names) to use the JAX model, or use the torch path"
        )
    clone = quantizer_free_copy(model)  # BN folds kept
    layers, weight_codes, smoothing = [], {}, {}
    tied = tied_parameters(clone)
    tied_to = {n: first for first, others in tied.items() for n in others}
    for i, (name, q) in enumerate(quantized_layers.items()):
        module = clone.get_submodule(name)
        wkey = f"{name}.{q.param}" if name else q.param
        wkey = tied_to.get(wkey, wkey)
        bias = getattr(module, q.bias_param, None)
        bkey = (f"{name}.{q.bias_param}" if name else q.bias_param) if isinstance(bias, torch.Tensor) else None
        layers.append(JaxLayer(name, i, wkey, bkey, _out_axis(module), q.act_scheme is not None))
        rec = records.get(name)
        if q.smoothing is not None:
            if wkey in tied or wkey in tied_to.values() or f"{name}.{q.param}" in tied_to:
                raise LoweringError(
                    f"layer {name!r} has SmoothQuant factors and a weight tied to another "
                    "parameter; the JAX model cannot scale one use of it"
                )
            smoothing[name] = along_channels(q.smoothing.cpu().numpy().astype(np.float32), q.weight_ndim)
        if rec is not None and rec.custom_codes:
            scale, offset = (weight_grid(v, q, rec.codes.shape) for v in (rec.weight_scale, rec.weight_offset))
            weight_codes[wkey] = (rec.codes.astype(np.float32) - offset) * scale
    lowered = lower(clone, example)
    for layer in layers:  # the weight quantizer of a smoothed layer sees W·diag(s)
        if layer.name in smoothing:
            lowered.params[layer.weight_key] = lowered.params[layer.weight_key] * jnp.asarray(smoothing[layer.name])
    float_weights = {layer.weight_key: lowered.params[layer.weight_key] for layer in layers}
    for key, dq in weight_codes.items():  # chosen codes: Ŵ itself (fake quant leaves it unchanged)
        lowered.params[key] = jnp.asarray(dq.astype(np.float32))
    state = {name: layer_state(records.get(name), q) for name, q in quantized_layers.items()}
    return QuantizedForward(
        lowered,
        layers,
        state,
        float_weights=float_weights,
        weight_scheme={n: q.weight_scheme for n, q in quantized_layers.items()},
        smoothing=smoothing,
        weight_groups={n: q.weight_group for n, q in quantized_layers.items() if q.weight_group is not None},
    )


def refuse_weight_groups(qf: QuantizedForward, what: str) -> None:
    """`LoweringError` where `what` works on one weight scale per output channel and `qf`
    has layers with a scale per group of columns."""
    if qf.weight_groups:
        names = list(qf.weight_groups)
        raise LoweringError(
            f"{what} works on one weight scale per output channel; layers {names[:3]} have one per group of "
            f"{qf.weight_groups[names[0]]} input columns (QuantConfig.w_group_size) — calibrate with "
            "w_group_size=None for it"
        )
