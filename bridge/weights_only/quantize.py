"""Streaming weight-only quantization of a safetensors checkpoint, never building the model.

Every tensor that matches `include` and not `exclude` (2-D or more, floating point: the
weights of Linear/Conv layers) is quantized per output channel or per group of
`group_size` input values (`jaxq.weights_only`) and written as msModelSlim's weight-only
layout: `<name>` the integer codes (int8 containers), `<name>_scale` and `<name>_offset`
`[out, groups]` with `Ŵ = (q − offset)·scale`. Every other tensor is copied byte for byte.
Output: shards of at most `shard_size_mib`, `model.safetensors.index.json`,
`quant_model_description.json` (`{tensor: "W4" | "FLOAT"}`).

Memory: each tensor is read in row blocks sized from `memory_budget_mib` (default: an
eighth of RAM, at most 1 GiB) and written into its shard as it is produced; peak memory is
the budget plus the process itself. Resumable: a shard appears only when complete, and
`weights_only_progress.json` records finished shards with a SHA-256 of their source
tensors' bytes; running again with the same checkpoint and options skips a finished
shard only when its source is unchanged (a checkpoint rewritten in place is quantized again).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bridge.capture.memory import budget_bytes
from bridge.weights_only.safetensors_io import (
    CheckpointError,
    OutTensor,
    ShardFile,
    TensorInfo,
    copy_raw,
    open_checkpoint,
    read_rows,
)
from jaxq.padding import power_of_two
from jaxq.scheme import ALLOWED_BITS, QScheme
from jaxq.weights_only import METHODS, quantize_block, row_width

PROGRESS = "weights_only_progress.json"
INDEX = "model.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"
FLOATS = ("F64", "F32", "F16", "BF16")
CHUNK_ROWS = 1024  # rows per lax.map step
WORK_COPIES = 8  # float32 copies of a block alive while it is quantized (ADMM's temporaries)


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
    """What `quantize_checkpoint` does (validated; errors name the field)."""

    bits: int = 4
    method: str = "rtn"
    group_size: int | None = 128
    symmetric: bool = True
    include: tuple = ("*.weight",)
    exclude: tuple = ("*embed*", "*norm*", "*lm_head*")
    iters: int = 100
    memory_budget_mib: int | None = None
    shard_size_mib: int = 2048

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS or self.bits > 8:
            raise ValueError(f"bits={self.bits!r}: weight-only quantization supports 2 to 8 bits")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {METHODS}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2
        ):
            raise ValueError(f"group_size={self.group_size!r}: an int ≥ 2, or None for per-channel")
        for field in ("include", "exclude"):
            value = getattr(self, field)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(p, str) for p in value):
                raise TypeError(f"{field}={value!r}: glob patterns (str)")
            object.__setattr__(self, field, value)
        if not isinstance(self.iters, int) or not 1 <= self.iters <= 10000:
            raise ValueError(f"iters={self.iters!r}: an int in [1, 10000]")
        if self.memory_budget_mib is not None and (
            not isinstance(self.memory_budget_mib, int) or self.memory_budget_mib < 16
        ):
            raise ValueError(f"memory_budget_mib={self.memory_budget_mib!r}: an int ≥ 16, or None (auto)")
        if not isinstance(self.shard_size_mib, int) or self.shard_size_mib < 1:
            raise ValueError(f"shard_size_mib={self.shard_size_mib!r}: an int ≥ 1")

    @property
    def scheme(self) -> QScheme:
        return QScheme(bits=self.bits, signed=True, symmetric=self.symmetric, axis=0)

    def selects(self, info: TensorInfo) -> bool:
        return (
            info.dtype in FLOATS
            and len(info.shape) >= 2
            and info.shape[0] > 0
            and any(fnmatch.fnmatchcase(info.name, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(info.name, p) for p in self.exclude)
        )


@dataclasses.dataclass(frozen=True)
class Item:
    source: TensorInfo
    quantized: bool
    outputs: tuple[OutTensor, ...]


def plan(tensors: dict[str, TensorInfo], cfg: WeightOnlyConfig) -> list[list[Item]]:
    """The output shards: items in checkpoint order, each shard at most `shard_size_mib`
    (a larger tensor gets a shard of its own)."""
    items = []
    for info in tensors.values():
        if cfg.selects(info):
            name = info.name
            try:
                width = row_width(info.shape, cfg.group_size)
            except ValueError as e:
                raise CheckpointError(
                    f"tensor {name!r} {list(info.shape)}: {e}; exclude it (exclude=...) or choose another group_size"
                ) from None
            groups = int(np.prod(info.shape[1:])) // width
            outs = (
                OutTensor(name, "I8", info.shape),
                OutTensor(f"{name}_scale", "F32", (info.shape[0], groups)),
                OutTensor(f"{name}_offset", "I32", (info.shape[0], groups)),
            )
            items.append(Item(info, True, outs))
        else:
            items.append(Item(info, False, (OutTensor(info.name, info.dtype, info.shape),)))
    limit = cfg.shard_size_mib << 20
    shards, current, size = [], [], 0
    for item in items:
        n = sum(o.nbytes for o in item.outputs)
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        shards.append(current)
    return shards


def _fingerprint(tensors: dict[str, TensorInfo], cfg: WeightOnlyConfig) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    for t in tensors.values():
        h.update(f"{t.name}|{t.dtype}|{t.shape}|{t.nbytes}|{t.file.name}|{t.file.stat().st_size}".encode())
    return h.hexdigest()


def _source_digest(items: list[Item]) -> str:
    """SHA-256 of the source bytes of a shard's tensors (the checkpoint's contents, not its names)."""
    h = hashlib.sha256()
    for item in items:
        info = item.source
        h.update(info.name.encode())
        with open(info.file, "rb") as f:
            f.seek(info.begin)
            left = info.nbytes
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    raise CheckpointError(f"{str(info.file)!r} ends inside tensor {info.name!r} (truncated?)")
                h.update(block)
                left -= len(block)
    return h.hexdigest()


def _quantize_into(item: Item, shard: ShardFile, cfg: WeightOnlyConfig, budget: int, advance) -> None:
    info = item.source
    width = row_width(info.shape, cfg.group_size)
    groups_per_row = int(np.prod(info.shape[1:])) // width
    max_chunks = max(1, budget // (WORK_COPIES * 4 * width) // CHUNK_ROWS)
    max_chunks = 1 << (max_chunks.bit_length() - 1)  # blocks are powers of two of chunks (few shapes)
    rows_per_read = max(1, min(info.shape[0], max_chunks * CHUNK_ROWS // groups_per_row))
    chunks = -(-rows_per_read * groups_per_row // CHUNK_ROWS)
    padded = CHUNK_ROWS * power_of_two(chunks)  # a power of two of chunks: few shapes, little padding
    codes_name, scale_name, offset_name = (o.name for o in item.outputs)
    for start in range(0, info.shape[0], rows_per_read):
        stop = min(info.shape[0], start + rows_per_read)
        rows = read_rows(info, start, stop).reshape(-1, width)
        n = rows.shape[0]
        if not np.isfinite(rows).all():
            raise CheckpointError(
                f"tensor {info.name!r} has NaN or Inf in rows {start}…{stop - 1}; nothing was written for it"
            )
        block = np.zeros((padded, width), np.float32)
        block[:n] = rows
        codes, scale, offset = quantize_block(jnp.asarray(block), cfg.scheme, cfg.method, cfg.iters, CHUNK_ROWS)
        shard.write(codes_name, start, np.asarray(codes[:n]).astype(np.int8))
        shard.write(scale_name, start, np.asarray(scale[:n], np.float32))
        shard.write(offset_name, start, np.asarray(offset[:n]).astype(np.int32))
        advance((stop - start) * info.row_bytes)


def quantize_checkpoint(source, out, cfg: WeightOnlyConfig | None = None, progress: bool = True, **options) -> dict:
    """Quantize the checkpoint at `source` into directory `out` (see the module doc).
    Returns the description (tensor → "W<bits>" or "FLOAT"). Options: `WeightOnlyConfig`'s fields."""
    cfg = cfg or WeightOnlyConfig(**options)
    tensors = open_checkpoint(source)
    shards = plan(tensors, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(tensors, cfg)
    state_path = out / PROGRESS
    done = _finished_shards(out, fingerprint)  # finished shard → digest of its source tensors
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    budget = budget_bytes(cfg.memory_budget_mib)
    from tqdm.auto import tqdm

    total = sum(it.source.nbytes for s in shards for it in s)
    with tqdm(total=total, unit="B", unit_scale=True, desc="jaxq quantize-weights", disable=not progress) as bar:
        for name, items in zip(names, shards):
            if name in done and (out / name).exists():
                if _source_digest(items) == done[name]:
                    bar.update(sum(it.source.nbytes for it in items))
                    continue
                warnings.warn(
                    f"{name}: the source tensors of this finished shard changed since it was written "
                    f"(the checkpoint was rewritten in place); quantizing it again",
                    stacklevel=2,
                )
                del done[name]
            shard = ShardFile(
                out / name,
                [o for it in items for o in it.outputs],
                {"format": "pt", "quantization": f"W{cfg.bits} {cfg.method}"},
            )
            try:
                for item in items:
                    if item.quantized:
                        _quantize_into(item, shard, cfg, budget, bar.update)
                    else:
                        copy_raw(item.source, shard, item.source.name, max(1 << 20, budget // 4))
                        bar.update(item.source.nbytes)
                shard.close()
            except BaseException:
                shard.abort()
                raise
            done[name] = _source_digest(items)
            _write_json(state_path, {"fingerprint": fingerprint, "options": dataclasses.asdict(cfg), "done": done})
    description = _write_index(out, names, shards, cfg)
    state_path.unlink()
    return description


def _finished_shards(out: Path, fingerprint: str) -> dict[str, str]:
    """The shards an earlier, interrupted run of the same job finished (empty for a new
    job); `CheckpointError` when `out` holds another job or a finished checkpoint."""
    state_path = out / PROGRESS
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{str(out)!r} holds an unfinished run of another checkpoint or other options "
                f"({state.get('options')}); use another directory or delete {PROGRESS} there"
            )
        return state["done"] if isinstance(state.get("done"), dict) else {}
    if (out / INDEX).exists():
        raise CheckpointError(f"{str(out)!r} already holds a quantized checkpoint; use another directory")
    return {}


def _write_index(out: Path, names: list[str], shards, cfg: WeightOnlyConfig) -> dict:
    """`quant_model_description.json` and the safetensors index; returns the description."""
    weight_map = {o.name: name for name, items in zip(names, shards) for it in items for o in it.outputs}
    description = {"model_quant_type": f"W{cfg.bits}A16", "method": cfg.method, "group_size": cfg.group_size or 0}
    for items in shards:
        for it in items:
            for o in it.outputs:
                description[o.name] = f"W{cfg.bits}" if it.quantized else "FLOAT"
    _write_json(out / DESCRIPTION, description)
    total = sum(o.nbytes for s in shards for it in s for o in it.outputs)
    _write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return description


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def dequantize(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """`Ŵ = (q − offset)·scale` for a tensor written here (`[out, …]`, `[out, groups]`)."""
    out, groups = scale.shape
    q = codes.reshape(out, groups, -1).astype(np.float32)
    return ((q - offset[..., None]) * scale[..., None]).reshape(codes.shape)
