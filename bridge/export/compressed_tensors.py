"""compressed-tensors checkpoints (the format of llm-compressor, loaded by `transformers`
and vLLM) from a decoder quantized by `bridge.llm.quantize_decoder`.

The directory holds `config.json` (the model's config plus `quantization_config`) and
`model.safetensors`. A quantized Linear `name` becomes

    name.weight_packed      int32, the codes `q` (+2^(b−1)) packed densely, 32 codes in b words
                            (format "pack-quantized", any b ≤ 8) — or `name.weight` int8
                            (format "int-quantized", 8-bit weights)
    name.weight_scale       [o, G] (groups) or [o, 1] (per channel), the model's float dtype
    name.weight_zero_point  the offsets `o` (asymmetric weights only; packed along rows)
    name.weight_shape       [o, d]

with `Ŵ = (q − o)·s` as in `jaxq.numerics`. Activation quantization is described, not
stored: dynamic per token (`strategy: token, dynamic: true`), or a static per-tensor
`name.input_scale`. Every other tensor of the model (embeddings, norms with AWQ scales
folded in, LM head) is written as it is in memory, so the checkpoint is the quantized
model, not the float one.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import torch
from safetensors.torch import save_file

from bridge.export.files import atomic_directory

FORMAT_VERSION = "compressed-tensors"


class AsymmetricPackedWarning(UserWarning):
    """An asymmetric pack-quantized checkpoint, which `transformers` cannot load yet."""


def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
    """Dense little-endian bit packing of signed `bits`-bit codes `[rows, cols]` into
    int32 `[rows, ceil(cols·bits/32)]` (each code stored as `q + 2^(bits−1)`)."""
    rows, cols = codes.shape
    u = (codes.astype(np.int64) + (1 << (bits - 1))).astype(np.uint64)
    padded = math.ceil(cols / 32) * 32
    u = np.pad(u, ((0, 0), (0, padded - cols)))
    bit_planes = (u[:, :, None] >> np.arange(bits, dtype=np.uint64)) & 1  # [rows, padded, bits]
    stream = bit_planes.reshape(rows, -1, 32)  # 32 bits per word, little-endian
    words = (stream << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)
    return words[:, : math.ceil(cols * bits / 32)].view(np.int32)


def _weights_args(cfg) -> dict:
    strategy = "group" if cfg.group_size else "channel"
    return {
        "num_bits": cfg.w_bit,
        "type": "int",
        "symmetric": cfg.w_sym,
        "strategy": strategy,
        "group_size": cfg.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _input_args(cfg) -> dict | None:
    if cfg.a_bit is None:
        return None
    dynamic = cfg.activations == "dynamic"
    return {
        "num_bits": cfg.a_bit,
        "type": "int",
        "symmetric": True,
        "strategy": "token" if dynamic else "tensor",
        "group_size": None,
        "dynamic": dynamic,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def quantization_config(cfg, quantized, linears) -> dict:
    """The `quantization_config` entry of `config.json`: `cfg` (`jaxq.llm.LlmConfig`), the
    names of the quantized Linear layers and of all Linear layers (the others are `ignore`)."""
    quantized = set(quantized)
    fmt = "int-quantized" if cfg.w_bit == 8 else "pack-quantized"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": sorted(quantized),
                "weights": _weights_args(cfg),
                "input_activations": _input_args(cfg),
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": [n for n in linears if n not in quantized],
        "kv_cache_scheme": None,
    }


def linear_tensors(name: str, rec, cfg, dtype: torch.dtype) -> dict:
    """The checkpoint tensors of one quantized Linear (`bridge.llm.LinearRecord`)."""
    o, d = rec.codes.shape
    out = {f"{name}.weight_scale": torch.from_numpy(rec.scale.reshape(o, -1).copy()).to(dtype)}
    if cfg.w_bit == 8:
        out[f"{name}.weight"] = torch.from_numpy(rec.codes.astype(np.int8))
    else:
        out[f"{name}.weight_packed"] = torch.from_numpy(pack_int32(rec.codes, cfg.w_bit))
        out[f"{name}.weight_shape"] = torch.tensor([o, d], dtype=torch.int64)
    if not cfg.w_sym:
        zp = rec.offset.reshape(o, -1).astype(np.int8)
        out[f"{name}.weight_zero_point"] = (
            torch.from_numpy(zp)
            if cfg.w_bit == 8
            else torch.from_numpy(np.ascontiguousarray(pack_int32(zp.T, cfg.w_bit).T))
        )
    if rec.input_scale is not None:
        out[f"{name}.input_scale"] = torch.tensor([rec.input_scale], dtype=dtype)
    return out


def export_compressed_tensors(result, path) -> None:
    """Write `result` (a `bridge.llm.LlmQuantized`) as a compressed-tensors checkpoint
    directory at `path` (published whole by one rename; module docstring)."""
    model, cfg = result.model, result.cfg
    if not result.records:
        raise ValueError("the result quantized no Linear layer; nothing to export as compressed-tensors")
    if result.rotation_hooks:
        raise ValueError(
            "this model rotates down_proj's inputs at run time (LlmConfig(rotate=True, online_hadamard=True)); "
            "a compressed-tensors checkpoint cannot carry that hook — quantize with online_hadamard=False to export"
        )
    if not cfg.w_sym and cfg.w_bit < 8:
        warnings.warn(
            f"asymmetric {cfg.w_bit}-bit weights (LlmConfig(w_sym=False)) are written as compressed-tensors "
            "writes them (zero points packed along rows), which its own decompressor reads, but transformers' "
            "from_pretrained refuses them with a size mismatch on weight_zero_point (an upstream limitation, "
            "llm-compressor issue #1618); use w_sym=True for checkpoints transformers should load",
            AsymmetricPackedWarning,
            stacklevel=2,
        )
    dtype = next(model.parameters()).dtype
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in result.records}
    for name, rec in result.records.items():
        tensors.update(linear_tensors(name, rec, cfg, dtype))
    config = model.config.to_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    config["quantization_config"] = quantization_config(cfg, result.records, linears)
    config["architectures"] = [type(model).__name__]
    with atomic_directory(path, export=FORMAT_VERSION) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
