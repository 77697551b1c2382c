"""Reading and writing safetensors files by row ranges, without loading whole tensors.

The format: 8 bytes little-endian header length, a JSON header `{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}`, then the raw row-major data. Rows
of a tensor (slices of its first axis) are contiguous, so a row block is one read. BF16
(which NumPy cannot name) is widened to float32 on read and copied as bytes when passed
through.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint file or index is missing, truncated or inconsistent (names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple
    begin: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def read_header(path: Path) -> dict[str, TensorInfo]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            looks_safetensors = len(head) == 9 and head[8:9] == b"{"  # 8-byte header length, then JSON
            if not looks_safetensors and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):
                raise CheckpointError(
                    f"{str(path)!r} is a torch.save / pickle file, not safetensors (jaxq never "
                    "unpickles files); convert it with safetensors.torch.save_file(state_dict, ...)"
                )
            (length,) = struct.unpack("<Q", head[:8])
            if length > size - 8:
                raise CheckpointError(f"{str(path)!r}: header length {length} exceeds the file ({size} bytes)")
            header = json.loads(head[8:] + f.read(length - 1))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
    start = 8 + length
    out = {}
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r}: the safetensors header is not a JSON object (corrupt file?)")
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not (
            isinstance(meta, dict)
            and {"dtype", "shape", "data_offsets"} <= set(meta)
            and len(meta["data_offsets"]) == 2
        ):
            raise CheckpointError(
                f"{str(path)!r}: the header entry of tensor {name!r} is corrupt ({str(meta)[:80]}); "
                "expected dtype, shape and data_offsets"
            )
        if meta.get("dtype") not in DTYPES:
            raise CheckpointError(
                f"{str(path)!r}: tensor {name!r} has dtype {meta.get('dtype')!r}; supported: {sorted(DTYPES)}"
            )
        b, e = meta["data_offsets"]
        if start + e > size:
            raise CheckpointError(
                f"{str(path)!r}: tensor {name!r} ends at byte {start + e}, past the end ({size}): truncated?"
            )
        out[name] = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), start + b, e - b)
    return out


def open_checkpoint(source) -> dict[str, TensorInfo]:
    """Every tensor of a `.safetensors` file, a `*.safetensors.index.json`, or a directory
    holding either (name → `TensorInfo`, in file order)."""
    source = Path(source)
    if source.is_dir():
        indexes = sorted(source.glob("*.safetensors.index.json"))
        files = sorted(source.glob("*.safetensors"))
        if indexes:
            source = indexes[0]
        elif len(files) == 1:
            source = files[0]
        else:
            raise CheckpointError(
                f"{str(source)!r} holds {len(files)} .safetensors files and no index; pass one file or the index"
            )
    if source.name.endswith(".index.json"):
        try:
            weight_map = json.loads(source.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{str(source)!r} is not a safetensors index (weight_map): {e}") from None
        out: dict[str, TensorInfo] = {}
        for file in dict.fromkeys(weight_map.values()):
            path = source.parent / file
            if not path.exists():
                raise CheckpointError(f"{str(source)!r} names shard {file!r}, which does not exist")
            out.update(read_header(path))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{str(source)!r} maps {missing[:3]} to shards that do not hold them")
        return out
    if not source.exists():
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist")
    return read_header(source)


def read_rows(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows `[start, stop)` of a tensor as float32 (BF16 widened exactly)."""
    row = info.row_bytes
    with open(info.file, "rb") as f:
        f.seek(info.begin + start * row)
        raw = f.read((stop - start) * row)
    if len(raw) != (stop - start) * row:
        raise CheckpointError(f"{str(info.file)!r}: tensor {info.name!r} is truncated")
    shape = (stop - start,) + tuple(info.shape[1:])
    data = np.frombuffer(raw, DTYPES[info.dtype]).reshape(shape)
    if info.dtype == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(DTYPES[self.dtype]).itemsize


class ShardFile:
    """A safetensors file whose header is written first and whose tensors are filled in by
    row blocks, in any order; it appears under its name only when `close()` is called
    (written as `<name>.partial`, then renamed), so an interrupted shard is never mistaken
    for a finished one."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.start = 8 + len(raw)
        self.offsets = {t.name: self.start + header[t.name]["data_offsets"][0] for t in tensors}
        self.tensors = {t.name: t for t in tensors}
        self.file = open(self.partial, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.file.truncate(self.start + offset)

    def write(self, name: str, row_start: int, data: np.ndarray | bytes) -> None:
        t = self.tensors[name]
        row = t.nbytes // t.shape[0] if t.shape and t.shape[0] else t.nbytes
        self.file.seek(self.offsets[name] + row_start * row)
        self.file.write(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes())

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def copy_raw(info: TensorInfo, shard: ShardFile, name: str, block_bytes: int) -> None:
    """Copy a tensor's bytes unchanged (any dtype), in blocks of at most `block_bytes`."""
    done = 0
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        shard.file.seek(shard.offsets[name])
        while done < info.nbytes:
            chunk = f.read(min(block_bytes, info.nbytes - done))
            shard.file.write(chunk)
            done += len(chunk)
