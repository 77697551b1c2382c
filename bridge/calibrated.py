"""`Calibrated`: a calibrated model as data (torchao pt2e's habit: the model carries its
state, one spec per tensor).

It is what exports, studies, accuracy control and the JAX model take, instead of the
`Calibrator` facade: the model with jaxq's quantizers attached, one `LayerRecord` per
quantized layer (`x̂ = (q − o)·s`, docs/design.md §3), the config and the layer geometry.
`Calibrator.calibrated()` builds one; so can any code that holds those pieces.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

import jaxq
from bridge.inplace.record import LayerRecord, params_view


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """A calibrated model: `model` with `quantizers` (name → `LayerQuantizer`) attached,
    `records` (name → `LayerRecord`, the model as it is now), `cfg`, `specs` (name →
    `jaxq.LayerSpec`), the folded `(conv, bn)` pairs and the calibration data (the example
    batch of tracing exports)."""

    model: nn.Module
    quantizers: dict
    records: dict[str, LayerRecord]
    cfg: jaxq.QuantConfig
    specs: dict
    fused: tuple = ()
    calib_data: Any = None

    def params(self) -> dict[str, dict]:
        """`{key: {layer: array}}` for `bridge.inplace.record.PARAM_KEYS`, a view of the records."""
        bits = max((self.cfg.weight_bits_for(n) for n in self.records), default=self.cfg.w_bit)
        return params_view(self.records, bits, self.cfg.w_signed)

    def layer_descriptions(self) -> dict[str, dict]:
        """Per quantized layer: kind, geometry, weight shape and schemes (JSON-ready)."""
        out = {}
        for name, q in self.quantizers.items():
            spec = dataclasses.asdict(self.specs[name])
            spec.pop("name")
            out[name] = {
                **spec,
                "module_type": type(q.module).__name__.removeprefix("Parametrized"),
                "weight_param": q.param,
                "functional": q.functional,
                "weight_shape": list(q.float_weight.shape),
                "weight_scheme": self.cfg.weight_scheme_for(name).describe(),
                "weight_group": q.weight_group,  # input columns per weight scale; None: per channel
                "act_scheme": self.cfg.act_scheme_for(name).describe() if self.cfg.act_quant else None,
            }
        return out
