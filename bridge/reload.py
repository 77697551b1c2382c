"""Rebuild a fake-quant model from an `export_param` directory, without calibration data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

import jaxq
from bridge.export import FORMAT_VERSION, JSON_NAME, SAFETENSORS_NAME
from bridge.fakequant import QuantWrapper, custom_codes, set_module
from bridge.fuse import fold_bn_into_conv


def read_params(path) -> tuple[dict, dict[str, np.ndarray]]:
    """`(description, tensors)` of an exported parameter directory, checked."""
    path = Path(path)
    missing = [n for n in (JSON_NAME, SAFETENSORS_NAME) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is not a jaxq parameter directory: missing {missing}")
    description = json.loads((path / JSON_NAME).read_text())
    if description.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path / JSON_NAME)!r} has format_version {description.get('format_version')!r}; "
                         f"this jaxq reads {FORMAT_VERSION}")
    return description, load_file(str(path / SAFETENSORS_NAME))


def load_quantized(model: nn.Module, path) -> nn.Module:
    """Quantize `model` (the same float architecture and weights that were calibrated) in
    place from the parameters in `path`: the recorded Conv+BN folds, the fake-quant
    wrappers and their buffers. Outputs are bit-identical to the calibrated model's."""
    description, tensors = read_params(path)
    cfg_dict = dict(description["config"])
    cfg = jaxq.QuantConfig(**{k: (tuple(map(tuple, v)) if k == "input_shape" and v else v) for k, v in cfg_dict.items()})
    model.eval()
    modules = dict(model.named_modules())
    for conv, bn in description.get("fused", []):
        if conv not in modules or bn not in modules:
            raise ValueError(f"the model has no layers {conv!r}/{bn!r} recorded as fused in {str(path)!r}")
        fold_bn_into_conv(modules[conv], modules[bn])
        set_module(model, bn, nn.Identity())
    act_scheme = cfg.act_scheme if cfg.act_quant else None
    for name in description["layers"]:
        if name not in modules:
            raise ValueError(f"the model has no layer {name!r} listed in {str(path)!r}")
        wrapper = QuantWrapper(modules[name], cfg.weight_scheme, act_scheme)
        act = f"{name}.input_scale" in tensors
        wrapper.set_qparams(
            torch.from_numpy(tensors[f"{name}.weight_scale"]), torch.from_numpy(tensors[f"{name}.weight_offset"]),
            torch.from_numpy(tensors[f"{name}.input_scale"]) if act else None,
            torch.from_numpy(tensors[f"{name}.input_offset"]) if act else None,
        )
        if f"{name}.quant_weight" in tensors:  # SQuant / AdaRound codes
            wrapper.set_weight_codes(custom_codes(wrapper, tensors[f"{name}.quant_weight"]))
        if f"{name}.bias_correction" in tensors:
            wrapper.set_bias_correction(torch.from_numpy(tensors[f"{name}.bias_correction"]))
        wrapper.quant_enabled = True
        set_module(model, name, wrapper)
    return model
