"""Atomic export of quantization parameters.

`write_params` writes, into one directory:

- `quant_params.safetensors`: per layer `<name>.weight_scale`, `.weight_offset`,
  `.quant_weight` (int8 for ≤ 8 bits, else int16/int32) and, with activation
  quantization, `.input_scale`, `.input_offset`;
- `quant_params.json`: the format version, the config, and per layer its kind, weight
  shape, weight and activation schemes;
- on request (`legacy=True`), msModelSlim's layout: `input_scale.npy`,
  `input_offset.npy`, `weight_scale.npy`, `weight_offset.npy`, `quant_weight.npy`, each
  a pickled dict `{layer name: array}`.

Every file is first written into a temporary directory beside the target and moved into
place only when all of them were written: a failure leaves no partial files.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

FORMAT_VERSION = 1
SAFETENSORS_NAME = "quant_params.safetensors"
JSON_NAME = "quant_params.json"
LEGACY_KEYS = ("input_scale", "input_offset", "weight_scale", "weight_offset", "quant_weight")


class ExportError(OSError):
    """The export target cannot be written."""


def integer_dtype(bits: int) -> np.dtype:
    return np.dtype(np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a staging directory; on success move its files into `path`, else delete it."""
    target = Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create export directory {str(target)!r}: {e.strerror or e}") from e
    if not os.access(target, os.W_OK | os.X_OK):
        raise ExportError(f"export directory {str(target)!r} is not writable")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".jaxq-export-", dir=target))
    except OSError as e:
        raise ExportError(f"cannot write into export directory {str(target)!r}: {e.strerror or e}") from e
    try:
        yield staging
        for f in sorted(staging.iterdir()):
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_tensors(tensors: dict, path: str, metadata: dict) -> None:
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # the writer creates 0600 files; honour the umask like open() does


def write_params(path, params: dict[str, dict[str, np.ndarray]], layers: dict[str, dict], config: dict,
                 legacy: bool = False, fused=()) -> list[Path]:
    """Write `params` (the five dicts of `get_quant_params`) atomically; return the files.

    `fused` lists the `(conv, bn)` pairs folded before calibration, so a reload can
    rebuild the same model without data.
    """
    tensors = {}
    for key, per_layer in params.items():
        for name, arr in per_layer.items():
            tensors[f"{name}.{key}"] = np.array(arr, order="C")  # ascontiguousarray would make 0-d arrays 1-d
    description = {"format_version": FORMAT_VERSION, "config": config, "layers": layers,
                   "fused": [list(p) for p in fused]}
    names = [SAFETENSORS_NAME, JSON_NAME] + ([f"{k}.npy" for k in LEGACY_KEYS] if legacy else [])
    with atomic_directory(path) as staging:
        _save_tensors(dict(sorted(tensors.items())), str(staging / SAFETENSORS_NAME), metadata={"format": "jaxq"})
        (staging / JSON_NAME).write_text(json.dumps(description, indent=2, sort_keys=True))
        if legacy:
            for key in LEGACY_KEYS:
                np.save(staging / f"{key}.npy", dict(params.get(key, {})), allow_pickle=True)
    return [Path(path) / n for n in names]


def write_w8a8(path, tensors: dict[str, np.ndarray], description: dict, safetensors_name: str, json_name: str) -> list[Path]:
    """Write msModelSlim's W8A8 safetensors + description JSON atomically."""
    for name in (safetensors_name, json_name):
        if not name or "/" in name or name in (".", ".."):
            raise ExportError(f"file name {name!r} must be a plain file name")
    with atomic_directory(path) as staging:
        _save_tensors({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, str(staging / safetensors_name),
                      metadata={"format": "pt"})
        (staging / json_name).write_text(json.dumps(description, indent=2))
    return [Path(path) / safetensors_name, Path(path) / json_name]
