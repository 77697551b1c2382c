"""Atomic exports of quantization parameters.

`write_params` writes, into one directory:

- `quant_params.safetensors`: per layer `<name>.weight_scale`, `.weight_offset` (`[out]`,
  or `[out, in/g]` with `QuantConfig.w_group_size`), `.quant_weight` (int8 for ≤ 8 bits,
  else int16/int32) and, with activation quantization, `.input_scale`, `.input_offset`;
- `float_params.safetensors`: every other tensor the model's output depends on
  (`bridge.export.float_state`);
- `quant_params.json`: the format version, the config, and per layer its kind, weight
  shape, weight and activation schemes, weight group;
- on request (`legacy=True`), msModelSlim's layout: `input_scale.npy`,
  `input_offset.npy`, `weight_scale.npy`, `weight_offset.npy`, `quant_weight.npy`, each
  a pickled dict `{layer name: array}`.

Every export (parameters, W8A8, ONNX) is published by renaming a complete directory into
place (`atomic_directory`): the new files, a manifest (`jaxq_manifest.json`: every file
with its SHA-256, which export wrote it, a fingerprint of the model it describes), the
user's own files (hard links) and the files of other exports of the *same* model are
assembled in a sibling staging directory, which then replaces the target in one rename.
A failure at any point leaves the earlier export whole; files of an earlier export of
another model are not carried over; a reader refuses a directory whose manifest is
missing, does not list its files or does not match them.
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

from bridge.inplace.record import LEGACY_KEYS

FORMAT_VERSION = 1
SAFETENSORS_NAME = "quant_params.safetensors"
JSON_NAME = "quant_params.json"
MANIFEST_NAME = "jaxq_manifest.json"
FLOAT_NAME = "float_params.safetensors"
PARAM_FILES = (SAFETENSORS_NAME, JSON_NAME, FLOAT_NAME, *(f"{k}.npy" for k in LEGACY_KEYS))
RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically (Linux)


class ExportError(OSError):
    """The export target cannot be written."""


def integer_dtype(bits: int, signed: bool = True) -> np.dtype:
    from bridge.inplace.record import integer_dtype as container

    return container(bits, signed)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, export: str = "files", model: str | None = None):
    """Yield a staging directory for the files of one `export`; on success publish it.

    The staging directory is a sibling of `path`; it receives the user's own entries of
    `path` (hard links), the files of other exports of the same `model` fingerprint
    listed in the old manifest, and the new manifest, then replaces `path` in one
    atomic rename. On failure `path` is untouched."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ExportError(f"export target {str(target)!r} exists and is not a directory")
    cwd = Path.cwd().resolve()
    if target.exists() and (cwd == target.resolve() or target.resolve() in cwd.parents):
        raise ExportError(
            f"export target {str(target)!r} is the working directory or holds it; an export replaces its "
            "directory as a whole — give it a directory of its own (e.g. 'params')"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create export directory {str(target)!r}: {e.strerror or e}") from e
    for d in (target.parent, target):
        if d.exists() and not os.access(d, os.W_OK | os.X_OK):
            raise ExportError(
                f"export directory {str(d)!r} is not writable (an export is published by a rename in "
                f"{str(target.parent)!r})"
            )
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.jaxq-", dir=target.parent))
    except OSError as e:
        raise ExportError(f"cannot create export directory {str(target)!r}: {e.strerror or e}") from e
    try:
        yield staging
        written = sorted(p.name for p in staging.iterdir())
        old = _old_manifest(target)
        kept = _carry_over(target, staging, old, written, export, model)
        files = {n: sha256(staging / n) for n in written}
        files.update({n: old["files"][n] for n in kept})
        exports = {k: v for k, v in old.get("exports", {}).items() if k != export and set(v) <= set(kept)}
        exports[export] = written
        manifest = {
            "format": "jaxq",
            "model": model,
            "exports": dict(sorted(exports.items())),
            "files": dict(sorted(files.items())),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _publish(staging, target)
    except OSError as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(
            f"cannot write the export into {str(target)!r}: {e.strerror or e}; the directory is as it was"
        ) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _old_manifest(target: Path) -> dict:
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text())
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else {}
    except (OSError, ValueError):
        return {}


def _carry_over(
    target: Path, staging: Path, old: dict, written: list[str], export: str, model: str | None
) -> list[str]:
    """Hard-link into `staging` what the new export keeps of `target`; return the kept jaxq files."""
    if not target.is_dir():
        return []
    same_model = model is not None and old.get("model") == model
    ours = set(old["files"]) if old else set()
    kept_jaxq = set()
    if same_model:
        for name, files in old.get("exports", {}).items():
            if name != export:
                kept_jaxq |= set(files)
    kept = []
    for entry in target.iterdir():
        name = entry.name
        if name in written or name == MANIFEST_NAME or name.startswith(".jaxq-export-"):
            continue
        if name in ours or name in PARAM_FILES:
            if name not in kept_jaxq:
                continue  # a file of an earlier export of another model: not carried over
            kept.append(name)
        _link(entry, staging / name)
    return kept


def _link(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish(staging: Path, target: Path) -> None:
    """Put `staging` at `target`: an atomic swap where the kernel offers one, else two renames."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        return  # `staging` now holds the old directory; the caller removes it
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.jaxq-old-", dir=target.parent))
    os.rename(target, old / "d")
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0


def _save_tensors(tensors: dict, path: str, metadata: dict) -> None:
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # the writer creates 0600 files; honour the umask like open() does


def write_params(
    path,
    params: dict[str, dict[str, np.ndarray]],
    layers: dict[str, dict],
    config: dict,
    legacy: bool = False,
    fused=(),
    float_tensors: dict[str, np.ndarray] | None = None,
    model: str | None = None,
) -> list[Path]:
    """Write `params` (the dicts of `get_quant_params`) and `float_tensors` atomically;
    return the files.

    `fused` lists the `(conv, bn)` pairs folded before calibration, so a reload can
    rebuild the same model without data; `model` fingerprints the model (exports of one
    model share a directory).
    """
    tensors = {}
    for key, per_layer in params.items():
        for name, arr in per_layer.items():
            tensors[f"{name}.{key}"] = np.array(arr, order="C")  # ascontiguousarray would make 0-d arrays 1-d
    description = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "layers": layers,
        "fused": [list(p) for p in fused],
    }
    if float_tensors is not None:
        description["float_params"] = FLOAT_NAME
    names = (
        [SAFETENSORS_NAME, JSON_NAME]
        + ([FLOAT_NAME] if float_tensors is not None else [])
        + ([f"{k}.npy" for k in LEGACY_KEYS] if legacy else [])
    )
    try:
        text = json.dumps(description, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as e:
        raise ExportError(f"the description of {str(path)!r} holds a non-finite number (config or layers): {e}") from e
    target = Path(path).expanduser()
    with atomic_directory(target, "params", model) as staging:
        _save_tensors(dict(sorted(tensors.items())), str(staging / SAFETENSORS_NAME), metadata={"format": "jaxq"})
        (staging / JSON_NAME).write_text(text)
        if float_tensors is not None:
            _save_tensors(
                {k: np.ascontiguousarray(v) for k, v in sorted(float_tensors.items())},
                str(staging / FLOAT_NAME),
                metadata={"format": "jaxq"},
            )
        if legacy:
            for key in LEGACY_KEYS:
                np.save(staging / f"{key}.npy", dict(params.get(key, {})), allow_pickle=True)
    return [target / n for n in names] + [target / MANIFEST_NAME]


def verify_manifest(path) -> dict:
    """Check `path`'s manifest against its files; return the manifest. Errors name the file."""
    path = Path(path).expanduser()
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise ValueError(
            f"{str(path)!r} has no {MANIFEST_NAME}: the export is incomplete (interrupted?) or not jaxq's; export again"
        )
    try:
        manifest = json.loads(mpath.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(mpath)!r} is not a valid jaxq manifest: {e}") from e
    listed = [n for n in (SAFETENSORS_NAME, JSON_NAME) if n not in files]
    unlisted = [n for n in PARAM_FILES if n not in files and (path / n).exists()]
    if listed or unlisted:
        raise ValueError(
            f"{str(mpath)!r} does not list {listed + unlisted}: the manifest was edited or belongs to "
            "another export; export again"
        )
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{str(f)!r} listed in {MANIFEST_NAME} is missing")
        if sha256(f) != digest:
            raise ValueError(
                f"{str(f)!r} does not match its SHA-256 in {MANIFEST_NAME}: the file was changed or "
                "belongs to another export"
            )
    return manifest


def write_w8a8(
    path,
    tensors: dict[str, np.ndarray],
    description: dict,
    safetensors_name: str,
    json_name: str,
    model: str | None = None,
) -> list[Path]:
    """Write msModelSlim's W8A8 safetensors + description JSON atomically."""
    for name in (safetensors_name, json_name):
        if not name or "/" in name or name in (".", ".."):
            raise ExportError(f"file name {name!r} must be a plain file name")
    if safetensors_name == json_name:
        raise ExportError(f"safetensors and JSON file names are both {json_name!r}; one would overwrite the other")
    with atomic_directory(path, "w8a8", model) as staging:
        _save_tensors(
            {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())},
            str(staging / safetensors_name),
            metadata={"format": "pt"},
        )
        (staging / json_name).write_text(json.dumps(description, indent=2))
    return [Path(path) / safetensors_name, Path(path) / json_name]
