"""msModelSlim's deployment layout (`quant_model_weight_*.safetensors` +
`quant_model_description*.json`, as MindIE reads it) for a decoder quantized by
`bridge.llm.quantize_decoder`.

    W8A8          8-bit per-channel weights, static 8-bit inputs: `weight` int8,
                  `input_scale`, `input_offset`, `deq_scale = s_x·s_w`, `quant_bias`
                  (`bridge.export.w8a8`)
    W8A8_DYNAMIC  8-bit per-channel weights, dynamic per-token 8-bit inputs: `weight`
                  int8, `weight_scale`, `weight_offset` `[o, 1]`
    W8A16, W4A16  weight-only, per channel or per group: `weight` int8 (4-bit codes
                  unpacked), `weight_scale`, `weight_offset` `[o, G]`

`Ŵ = (q − offset)·scale`. Every other tensor is `FLOAT`. The description maps every
tensor to its type and carries `model_quant_type` and, for groups, `group_size`.
"""

from __future__ import annotations

import numpy as np
import torch

from bridge.export.files import ExportError, write_w8a8
from bridge.export.w8a8 import layer_tensors


def quant_type(cfg) -> str:
    """The msModelSlim type of an `LlmConfig` (`ExportError` when the layout has none)."""
    if cfg.a_bit is None and cfg.w_bit in (4, 8):
        return f"W{cfg.w_bit}A16"
    if cfg.w_bit == 8 and cfg.a_bit == 8 and cfg.group_size is None and cfg.w_sym:
        return "W8A8" if cfg.activations == "static" else "W8A8_DYNAMIC"
    raise ExportError(
        f"msModelSlim's layout has no type for {cfg.describe()} (w_sym={cfg.w_sym}); it holds W4A16, W8A16 "
        "(per channel or group), W8A8 and W8A8_DYNAMIC (8-bit symmetric per-channel weights)"
    )


def _linear(name: str, rec, kind: str) -> dict[str, np.ndarray]:
    if kind == "W8A8":
        return layer_tensors(name, rec.codes, rec.scale.reshape(-1), None, rec.input_scale, 0, act_signed=True)
    return {
        f"{name}.weight": rec.codes.astype(np.int8),
        f"{name}.weight_scale": rec.scale.astype(np.float32),
        f"{name}.weight_offset": rec.offset.astype(np.float32),
    }


def export_msmodelslim(result, path) -> list:
    """Write `result` (`bridge.llm.LlmQuantized`) in msModelSlim's layout at `path`
    (published whole by one rename); returns the two file paths."""
    cfg = result.cfg
    kind = quant_type(cfg)
    if result.rotation_hooks:
        raise ExportError("the online Hadamard of LlmConfig(online_hadamard=True) has no place in msModelSlim's layout")
    tensors, kinds = {}, {}
    for name, rec in result.records.items():
        t = _linear(name, rec, kind)
        tensors.update(t)
        kinds.update(dict.fromkeys(t, kind))
    for key, value in result.model.state_dict().items():
        if key.rsplit(".", 1)[0] not in result.records:
            tensors[key] = value.detach().to(torch.float32).contiguous().numpy()
            kinds[key] = "FLOAT"
    description = {"model_quant_type": kind, **({"group_size": cfg.group_size} if cfg.group_size else {})}
    description.update(sorted(kinds.items()))
    suffix = kind.lower()
    return write_w8a8(
        path, tensors, description, f"quant_model_weight_{suffix}.safetensors", f"quant_model_description_{suffix}.json"
    )
