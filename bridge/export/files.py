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

Every file is first written into a staging directory inside the target and moved into
place only when all of them were written. `write_params` publishes under a manifest
(`jaxq_manifest.json`, written last, naming every file with its SHA-256): the old
manifest is removed first, files of an earlier export that this one does not write
(legacy `.npy` dicts) are deleted, and a reader refuses a directory whose manifest is
missing or does not match its files — an interrupted export is never loaded as a mix.
"""
from __future__ import annotations

import contextlib
import hashlib
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
MANIFEST_NAME = "jaxq_manifest.json"
PARAM_FILES = (SAFETENSORS_NAME, JSON_NAME, *(f"{k}.npy" for k in LEGACY_KEYS))


class ExportError(OSError):
    """The export target cannot be written."""


def integer_dtype(bits: int, signed: bool = True) -> np.dtype:
    from bridge.record import integer_dtype as container

    return container(bits, signed)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a staging directory; on success move its files into `path`, else delete it."""
    target = Path(path).expanduser()
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
    try:
        text = json.dumps(description, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as e:
        raise ExportError(f"the description of {str(path)!r} holds a non-finite number (config or layers): {e}") from e
    target = Path(path).expanduser()
    if target.is_dir():  # from here until the new manifest, the directory reads as incomplete
        (target / MANIFEST_NAME).unlink(missing_ok=True)
    with atomic_directory(target) as staging:
        _save_tensors(dict(sorted(tensors.items())), str(staging / SAFETENSORS_NAME), metadata={"format": "jaxq"})
        (staging / JSON_NAME).write_text(text)
        if legacy:
            for key in LEGACY_KEYS:
                np.save(staging / f"{key}.npy", dict(params.get(key, {})), allow_pickle=True)
        manifest = {"format": "jaxq", "files": {n: sha256(staging / n) for n in names}}
    for stale in set(PARAM_FILES) - set(names):
        (target / stale).unlink(missing_ok=True)
    _write_atomic(target / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))
    return [target / n for n in names] + [target / MANIFEST_NAME]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {str(path)!r}: {e.strerror or e}") from e


def verify_manifest(path) -> dict:
    """Check `path`'s manifest against its files; return the manifest. Errors name the file."""
    path = Path(path).expanduser()
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise ValueError(f"{str(path)!r} has no {MANIFEST_NAME}: the export is incomplete (interrupted?) or not jaxq's; "
                         "export again")
    try:
        manifest = json.loads(mpath.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(mpath)!r} is not a valid jaxq manifest: {e}") from e
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{str(f)!r} listed in {MANIFEST_NAME} is missing")
        if sha256(f) != digest:
            raise ValueError(f"{str(f)!r} does not match its SHA-256 in {MANIFEST_NAME}: the file was changed or "
                             "belongs to another export")
    return manifest


def write_w8a8(path, tensors: dict[str, np.ndarray], description: dict, safetensors_name: str, json_name: str) -> list[Path]:
    """Write msModelSlim's W8A8 safetensors + description JSON atomically."""
    for name in (safetensors_name, json_name):
        if not name or "/" in name or name in (".", ".."):
            raise ExportError(f"file name {name!r} must be a plain file name")
    if safetensors_name == json_name:
        raise ExportError(f"safetensors and JSON file names are both {json_name!r}; one would overwrite the other")
    with atomic_directory(path) as staging:
        _save_tensors({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, str(staging / safetensors_name),
                      metadata={"format": "pt"})
        (staging / json_name).write_text(json.dumps(description, indent=2))
    return [Path(path) / safetensors_name, Path(path) / json_name]
