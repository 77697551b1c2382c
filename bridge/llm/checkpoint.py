"""Layer-by-layer quantization of a decoder checkpoint on disk that need not fit in memory
(`jaxq quantize-llm`).

The model is built on the meta device (no weights). The embedding is loaded, the
calibration tokens pass it once, and it is freed; then each decoder layer is loaded from
the safetensors checkpoint, quantized exactly as `bridge.llm.quantize_decoder` does it
(same steps, same code), run on the calibration inputs to give the next layer's inputs,
written as one compressed-tensors shard, and freed. The final norm and LM head are copied.
Memory holds one layer, the calibration hidden states (twice) and the statistics — never
the model.

Resumable: after each layer, its shard (complete or absent: written to a temporary name
and renamed) and the next layer's inputs are on disk, with a progress record that
fingerprints the source's tensor metadata, the config and the calibration tokens, and
each finished layer's source bytes. Started again with the same arguments, the run
continues after the last finished layer; a source rewritten in place is quantized again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bridge.capture.memory import release_freed_memory
from bridge.export.compressed_tensors import linear_tensors, quantization_config
from bridge.llm import activations
from bridge.llm.decoder import decoder_parts, first_layer_inputs, run_layer
from bridge.llm.sequential import _batches, _quantize_layer
from bridge.weights_only.safetensors_io import (
    CheckpointError,
    OutTensor,
    ShardFile,
    TensorInfo,
    copy_raw,
    open_checkpoint,
    read_rows,
)
from jaxq.llm import LlmConfig

PROGRESS = ".jaxq-llm-progress.json"
HIDDEN = ".jaxq-llm-hidden.safetensors"
INDEX = "model.safetensors.index.json"


def _load_module(module: torch.nn.Module, prefix: str, tensors: dict[str, TensorInfo]) -> None:
    """Materialise `module` (on meta) on the CPU with its tensors from the checkpoint."""
    module.to_empty(device="cpu")
    state = module.state_dict()
    missing = [f"{prefix}{k}" for k in state if f"{prefix}{k}" not in tensors]
    if missing:
        raise CheckpointError(f"the checkpoint has no tensor {missing[0]!r} (and {len(missing) - 1} more) of the model")
    with torch.no_grad():
        for k, v in state.items():
            info = tensors[f"{prefix}{k}"]
            if tuple(info.shape) != tuple(v.shape):
                raise CheckpointError(f"tensor {info.name!r} is {list(info.shape)}, the config gives {list(v.shape)}")
            v.copy_(torch.from_numpy(read_rows(info, 0, info.shape[0]).reshape(info.shape)))


def _digest(infos: list[TensorInfo]) -> str:
    h = hashlib.sha256()
    for info in infos:
        h.update(info.name.encode())
        with open(info.file, "rb") as f:
            f.seek(info.begin)
            h.update(f.read(info.nbytes))
    return h.hexdigest()


def _fingerprint(tensors: dict[str, TensorInfo], cfg: LlmConfig, tokens: torch.Tensor, batch_size: int) -> str:
    h = hashlib.sha256(repr((dataclasses.asdict(cfg), batch_size)).encode())
    for t in tensors.values():
        h.update(f"{t.name}|{t.dtype}|{t.shape}|{t.nbytes}".encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


def _write_atomic(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _layer_bytes(tensors: dict[str, TensorInfo], prefix: str) -> int:
    return sum(int(np.prod(t.shape)) * 4 for n, t in tensors.items() if n.startswith(prefix))


RUNTIME_MIB = 900  # XLA's compiled programs and buffers, torch's workspace, allocator slack (measured up to 860 MiB)


def memory_estimate(tensors, config, n_layers: int, tokens: torch.Tensor, batch_size: int, keep_rows: int) -> dict:
    """MiB the run grows by after its imports: the largest layer (float32, three copies:
    module, host arrays, dequantized), the calibration hidden states (inputs and outputs),
    each input group's statistics (`H` in float64, the row sample), one forward's
    activations at `batch_size` sequences, and the runtime's own (`RUNTIME_MIB`, the same
    for any model)."""
    mib = 2**20
    layer = max(_layer_bytes(tensors, f"model.layers.{i}.") for i in range(n_layers))
    h, m = config.hidden_size, config.intermediate_size
    states = 2 * tokens.numel() * h * 4
    stats = sum(d * d * 8 + keep_rows * d * 4 for d in (h, h, h, m))
    forward = batch_size * tokens.shape[1] * (4 * m + 8 * h) * 4
    parts = {"layer": 3 * layer, "hidden states": states, "statistics": stats, "forward": forward}
    return {**{k: v / mib for k, v in parts.items()}, "runtime": float(RUNTIME_MIB)}


def _check_budget(estimate: dict, budget_mib: int | None) -> None:
    if budget_mib is None or sum(estimate.values()) <= budget_mib:
        return
    parts = ", ".join(f"{k} {v:.0f}" for k, v in estimate.items())
    raise ValueError(
        f"memory_budget={budget_mib} MiB is below what the run needs: ~{sum(estimate.values()):.0f} MiB "
        f"({parts} MiB); raise the budget, lower batch_size or use fewer calibration tokens"
    )


def quantize_llm_checkpoint(
    source,
    out,
    calib_tokens: torch.Tensor,
    cfg: LlmConfig = LlmConfig(),
    batch_size: int = 16,
    memory_budget_mib: int | None = None,
    progress: bool = True,
) -> dict:
    """Quantize the decoder checkpoint directory `source` (`config.json` + safetensors)
    into a compressed-tensors checkpoint at `out`, layer by layer (module docstring).
    `memory_budget_mib` refuses up front a job whose `memory_estimate` exceeds it.
    Returns `{"seconds": {...}, "layers": n, "resumed_from": k, "estimate_mib": {...}}`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.rotate:
        raise ValueError("LlmConfig.rotate needs the whole model; use bridge.llm.quantize_decoder in memory")
    source, out = Path(source), Path(out)
    tensors = open_checkpoint(source)
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parts = decoder_parts(model)
    batches = _batches(calib_tokens, batch_size)
    estimate = memory_estimate(tensors, config, len(parts.layers), calib_tokens, batch_size, cfg.awq_rows)
    _check_budget(estimate, memory_budget_mib)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(tensors, cfg, calib_tokens.long(), batch_size)
    state = _progress(out, fingerprint)
    seconds: dict[str, float] = {}
    if hasattr(model.model, "rotary_emb"):  # its buffers are computed from the config, not loaded
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    _load_module(parts.embed, "model.embed_tokens.", tensors)
    inputs = first_layer_inputs(model, batches)
    parts.embed.to("meta")
    names = [f"model-layer-{i:05d}.safetensors" for i in range(len(parts.layers))]
    start = _resume_point(out, state, names, tensors)
    if start:
        saved = load_file(str(out / HIDDEN))
        inputs = [(saved[f"batch.{b}"], kw) for b, (_, kw) in enumerate(inputs)]
    quantized, weight_map = [], {}
    for i, layer in enumerate(tqdm(parts.layers, desc=f"jaxq quantize-llm {cfg.describe()}", disable=not progress)):
        prefix = f"model.layers.{i}."
        if i < start:
            weight_map.update(dict.fromkeys(state["tensors"][names[i]], names[i]))
            quantized += state["quantized"][names[i]]
            continue
        _load_module(layer, prefix, tensors)
        records, _, _, quantizers = _quantize_layer(layer, prefix[:-1], inputs, cfg, seconds)
        hooks = activations.install(layer, quantizers)
        inputs = run_layer(layer, inputs)
        for h in hooks:
            h.remove()
        shard = {
            f"{prefix}{k}": v for k, v in layer.state_dict().items() if f"{prefix}{k}".rsplit(".", 1)[0] not in records
        }
        for name, rec in records.items():
            shard.update(linear_tensors(name, rec, cfg, torch.float32))
        _write_atomic(shard, out / names[i])
        _write_atomic({f"batch.{b}": x.contiguous() for b, (x, _) in enumerate(inputs)}, out / HIDDEN)
        layer.to("meta")
        release_freed_memory()  # the next layer's peak would sit on top of this one's freed pages
        weight_map.update(dict.fromkeys(shard, names[i]))
        quantized += list(records)
        state["done"][names[i]] = _digest([t for n, t in tensors.items() if n.startswith(prefix)])
        state["tensors"][names[i]] = sorted(shard)
        state["quantized"][names[i]] = sorted(records)
        _write_json(out / PROGRESS, state)
    _finish(out, tensors, config, model, cfg, quantized, weight_map)
    return {"seconds": seconds, "layers": len(parts.layers), "resumed_from": start, "estimate_mib": estimate}


def _progress(out: Path, fingerprint: str) -> dict:
    path = out / PROGRESS
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{str(out)!r} holds an unfinished run of another checkpoint, config or calibration set; "
                f"use another directory or delete {PROGRESS} there"
            )
        return state
    if (out / INDEX).exists():
        raise CheckpointError(f"{str(out)!r} already holds a quantized checkpoint; use another directory")
    return {"fingerprint": fingerprint, "done": {}, "tensors": {}, "quantized": {}}


def _resume_point(out: Path, state: dict, names: list[str], tensors) -> int:
    """The first layer to quantize: after the finished layers whose shards exist and
    whose source bytes are unchanged (a changed layer and every later one run again)."""
    for i, name in enumerate(names):
        prefix = f"model.layers.{i}."
        if name not in state["done"] or not (out / name).exists() or not (out / HIDDEN).exists():
            return i
        if _digest([t for n, t in tensors.items() if n.startswith(prefix)]) != state["done"][name]:
            return i
    return len(names)


def _finish(out: Path, tensors, config, model, cfg: LlmConfig, quantized: list[str], weight_map: dict) -> None:
    """The embedding, final norm and LM head copied byte for byte; config and index."""
    rest = [t for n, t in tensors.items() if not n.startswith("model.layers.")]
    shard = ShardFile(
        out / "model-rest.safetensors", [OutTensor(t.name, t.dtype, t.shape) for t in rest], {"format": "pt"}
    )
    try:
        for t in rest:
            copy_raw(t, shard, t.name, 1 << 24)
        shard.close()
    except BaseException:
        shard.abort()
        raise
    weight_map.update({t.name: "model-rest.safetensors" for t in rest})
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    d = config.to_dict()
    d["quantization_config"] = quantization_config(cfg, quantized, linears)
    d["architectures"] = [type(model).__name__]
    _write_json(out / "config.json", d)
    _write_json(out / INDEX, {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
    (out / PROGRESS).unlink(missing_ok=True)
    (out / HIDDEN).unlink(missing_ok=True)
