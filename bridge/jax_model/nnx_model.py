"""The quantized model as a Flax NNX module (`QuantizedModel`).

Weights are `nnx.Param`s (keyed by their torch names), buffers `TorchBuffer`s, every
quantizer's state (`jaxq.model_quant.LayerQState` fields) `QuantizerState`s and the
per-layer switches `QuantSwitch`es, so a JAX user can `nnx.split` / `nnx.merge` it,
`nnx.jit` it, and fine-tune weights (`wrt=nnx.Param`) or scales (`wrt=QuantScale`, a
kind of `QuantizerState`; offsets and grids stay fixed) with optax through the
straight-through fake quant.
"""

from __future__ import annotations

from flax import nnx

from bridge.jax_model.quantized import QuantizedForward, refuse_weight_groups
from jaxq.model_quant import LayerQState, Switches


class TorchBuffer(nnx.Variable):
    """A torch buffer (running statistics, counters): not trained."""


class QuantizerState(nnx.Variable):
    """A quantizer's scale, offset, grid or bias correction."""


class QuantScale(QuantizerState):
    """A quantizer's scale (`w_scale`, `a_scale`): what LSQ-style fine-tuning trains."""


SCALES = ("w_scale", "a_scale")


class QuantSwitch(nnx.Variable):
    """Per-layer enable masks (1 = quantized)."""


class QuantizedModel(nnx.Module):
    """`model(*args, **kwargs)`: the calibrated model's quantized forward, in JAX."""

    def __init__(self, qf: QuantizedForward):
        refuse_weight_groups(qf, "QuantizedModel (its weight scales are trained per channel)")
        lw = qf.lowered
        self.weights = nnx.Dict({k: nnx.Param(v) for k, v in lw.params.items()})
        self.buffers = nnx.Dict({k: TorchBuffer(v) for k, v in lw.buffers.items()})
        kind = lambda f: QuantScale if f in SCALES else QuantizerState  # noqa: E731
        self.quantizers = nnx.Dict(
            {name: nnx.Dict({f: kind(f)(getattr(s, f)) for f in LayerQState._fields}) for name, s in qf.state.items()}
        )
        base = qf.default_switches()
        self.weight_switch = QuantSwitch(base.weight)
        self.input_switch = QuantSwitch(base.input)
        self.layer_names = nnx.static(tuple(qf.names))
        self._fn = nnx.static(qf.fn)

    def state_tree(self) -> dict[str, LayerQState]:
        return {
            name: LayerQState(*(self.quantizers[name][f][...] for f in LayerQState._fields))
            for name in self.layer_names
        }

    def __call__(self, *args, **kwargs):
        params = {k: v[...] for k, v in self.weights.items()}
        buffers = {k: v[...] for k, v in self.buffers.items()}
        switches = Switches(self.weight_switch[...], self.input_switch[...])
        return self._fn(params, buffers, self.state_tree(), switches, args, kwargs)
