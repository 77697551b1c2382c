"""Rebuild a fake-quant model from an `export_param` directory, without calibration data.

Everything is checked before the model is touched: the manifest (every file's SHA-256),
the JSON, the stored config (against the calibrator's, for `load_param`), layer names,
shapes, dtypes, code ranges and finiteness. Errors name the file and the layer; a failed
load leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file
from torch import nn

import jaxq
from bridge.export import FORMAT_VERSION, JSON_NAME, SAFETENSORS_NAME, verify_manifest
from bridge.export.float_state import check_float_state, write_float_state
from bridge.inplace.fakequant import LayerQuantizer, along_channels, set_quantization
from bridge.inplace.prepare import attach_quantizers
from bridge.inplace.fuse import fold, fold_bn_into_conv
from bridge.inplace.modules import quantizable_layers, weight_name
from bridge.inplace.record import INTEGER_KEYS, PARAM_KEYS, LayerRecord, apply_records, is_nearest, record_from_tensors
from bridge.inplace.transaction import ModelEdit, refuse_quantized


class ParamFileError(ValueError):
    """An exported parameter directory is incomplete, inconsistent or does not fit the model."""


def read_params(path) -> tuple[dict, dict[str, np.ndarray]]:
    """`(description, tensors)` of an exported parameter directory, checked."""
    path = Path(path).expanduser()
    missing = [n for n in (JSON_NAME, SAFETENSORS_NAME) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is not a jaxq parameter directory: missing {missing}")
    try:
        verify_manifest(path)
    except ValueError as e:
        raise ParamFileError(str(e)) from None
    try:
        description = json.loads((path / JSON_NAME).read_text())
    except ValueError as e:
        raise ParamFileError(f"{str(path / JSON_NAME)!r} is not valid JSON: {e}") from None
    if not isinstance(description, dict) or description.get("format_version") != FORMAT_VERSION:
        version = description.get("format_version") if isinstance(description, dict) else None
        raise ParamFileError(
            f"{str(path / JSON_NAME)!r} has format_version {version!r}; this jaxq reads {FORMAT_VERSION}"
        )
    for key in ("config", "layers"):
        if not isinstance(description.get(key), dict):
            raise ParamFileError(f"{str(path / JSON_NAME)!r} has no {key!r} section")
    try:
        tensors = load_file(str(path / SAFETENSORS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise ParamFileError(f"{str(path / SAFETENSORS_NAME)!r} cannot be read: {e}") from None
    return description, tensors


def read_float_params(path, description: dict) -> dict[str, np.ndarray] | None:
    """The carried float tensors (`bridge.export.float_state`), None for exports without them."""
    name = description.get("float_params")
    if name is None:
        return None
    source = Path(path).expanduser() / str(name)
    try:
        return load_file(str(source))
    except (SafetensorError, OSError, ValueError) as e:
        raise ParamFileError(f"{str(source)!r} cannot be read: {e}") from None


def load_float_params(model: nn.Module, path, description: dict, edit: ModelEdit) -> None:
    """Write the carried float tensors into `model` (checked first; replaced values logged in `edit`)."""
    stored = read_float_params(path, description)
    if stored is None:
        return
    source = repr(str(Path(path).expanduser() / str(description["float_params"])))
    try:
        live = check_float_state(model, stored, source)
    except ValueError as e:
        raise ParamFileError(str(e)) from None
    edit.replaced += write_float_state(live, stored)


def stored_config(description: dict, path) -> jaxq.QuantConfig:
    cfg = dict(description["config"])
    if cfg.get("input_shape"):
        cfg["input_shape"] = tuple(map(tuple, cfg["input_shape"]))
    try:
        return jaxq.QuantConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise ParamFileError(f"{str(Path(path) / JSON_NAME)!r}: its config is not valid: {e}") from None


def _records(path, description: dict, tensors: dict, cfg: jaxq.QuantConfig, weights: dict[str, np.ndarray]) -> dict:
    """Checked records for every layer of `description` (weights: name → float weight)."""
    source = str(Path(path) / SAFETENSORS_NAME)
    records: dict[str, LayerRecord] = {}
    for name in description["layers"]:
        for key in PARAM_KEYS:
            kinds = "iu" if key in INTEGER_KEYS else "f"
            t = tensors.get(f"{name}.{key}")
            if t is not None and t.dtype.kind not in kinds:
                raise ParamFileError(
                    f"{source}: layer {name!r}: {key} has dtype {t.dtype}, expected "
                    f"{'an integer' if kinds == 'iu' else 'a float'} type"
                )
        try:
            record = record_from_tensors(name, tensors, custom=False)
        except KeyError as e:
            raise ParamFileError(f"{source}: layer {name!r} has no tensor {e.args[0]!r}") from None
        group = cfg.w_group_size if weights[name].ndim == 2 else None  # as `prepare.weight_group`
        out = weights[name].shape[0]
        if (
            group is not None
            and record.weight_scale.size == record.weight_offset.size
            and record.weight_scale.size % out == 0
        ):
            # files hold them flat
            qshape = (out, -1)
            record = dataclasses.replace(
                record,
                weight_scale=record.weight_scale.reshape(qshape),
                weight_offset=record.weight_offset.reshape(qshape),
            )
        try:
            act_scheme = cfg.act_scheme_for(name) if cfg.act_quant else None
            record.check(name, weights[name].shape, cfg.weight_scheme_for(name), act_scheme, source, group)
        except ValueError as e:
            raise ParamFileError(str(e)) from None
        weight = weights[name]
        if record.smoothing is not None:
            weight = weight.astype(np.float32) * along_channels(record.smoothing, weight.ndim)
        custom = not is_nearest(
            weight, record.weight_scale, record.weight_offset, cfg.weight_scheme_for(name), record.codes
        )
        records[name] = dataclasses.replace(record, custom_codes=custom)
    return records


def read_records(
    path, cfg: jaxq.QuantConfig, layers: dict[str, LayerQuantizer], fused
) -> tuple[dict[str, LayerRecord], dict]:
    """Records for `Calibrator.load_param` and the export's description: the files must
    come from the same model and config."""
    description, tensors = read_params(path)
    stored = stored_config(description, path)
    stored = _unused_as_given(stored, cfg)
    if stored != cfg:
        diff = [f.name for f in dataclasses.fields(cfg) if getattr(stored, f.name) != getattr(cfg, f.name)]
        raise ParamFileError(
            f"{str(Path(path) / JSON_NAME)!r} was calibrated with another config "
            f"(differs in {diff or 'other fields'}); build the Calibrator with the stored config: "
            "bridge.export.reload.stored_config(...) or load_quantized(model, path)"
        )
    names = set(description["layers"])
    if names != set(layers):
        raise ParamFileError(
            f"{str(path)!r} holds layers that differ from this calibrator's quantized layers: "
            f"{sorted(names ^ set(layers))[:5]}; build it with the same model and config"
        )
    if [list(p) for p in fused] != description.get("fused", []):
        raise ParamFileError(f"{str(path)!r} records other Conv+BN folds than this calibrator made")
    weights = {n: q.original_weight.detach().float().cpu().numpy() for n, q in layers.items()}
    return _records(path, description, tensors, cfg, weights), description


# fields read only by a step that a config may not run: where neither the stored nor the
# given config runs it, the field does not count (files from before its default changed load)
def _runs_blocks(c: jaxq.QuantConfig) -> bool:
    return c.keep_acc.blocks is not None


USED_ONLY_WHEN = {
    "amp_metric": lambda c: c.amp_num > 0,
    "recon_holdout": _runs_blocks,
    "recon_hard_final": _runs_blocks,
    "recon_lr": _runs_blocks,
    "recon_reg": _runs_blocks,
}


def _unused_as_given(stored: jaxq.QuantConfig, cfg: jaxq.QuantConfig) -> jaxq.QuantConfig:
    """`stored` with every field that neither config uses set to `cfg`'s value."""
    unused = {f: getattr(cfg, f) for f, used in USED_ONLY_WHEN.items() if not used(stored) and not used(cfg)}
    return dataclasses.replace(stored, **unused)


def _folded_weights(
    model: nn.Module, description: dict, candidates: dict[str, nn.Module], path
) -> dict[str, np.ndarray]:
    """The float weight each layer will have after the recorded folds (computed, not applied)."""
    modules = dict(model.named_modules())
    out = {}
    folds = {conv: bn for conv, bn in description.get("fused", [])}
    for conv, bn in folds.items():
        if conv not in modules or bn not in modules or not isinstance(modules[bn], (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise ParamFileError(
                f"the model has no conv {conv!r} followed by a BatchNorm {bn!r}, recorded as fused in "
                f"{str(path)!r} (already folded, or another model?)"
            )
    for name in description["layers"]:
        if name not in candidates:
            raise ParamFileError(f"the model has no quantizable layer {name!r} listed in {str(path)!r}")
        module = candidates[name]
        if name in folds:
            module = copy.deepcopy(module)
            fold_bn_into_conv(module, modules[folds[name]])
        out[name] = getattr(module, weight_name(module)).detach().float().cpu().numpy()
    return out


def load_quantized(model: nn.Module, path) -> nn.Module:
    """Quantize `model` (the architecture that was calibrated) in place from the export in
    `path`: the recorded Conv+BN folds, the quantizers and their buffers, and the float
    tensors the export carries (biases, float layers, norms — replacing the model's own,
    so a model fine-tuned after calibration reloads as it was exported). Outputs are
    bit-identical to the calibrated model's at export. Everything is checked; on failure
    the model is unchanged, and `restore_model` gives back the model as it was."""
    refuse_quantized(model)
    description, tensors = read_params(path)
    cfg = stored_config(description, path)
    candidates = quantizable_layers(model)
    records = _records(path, description, tensors, cfg, _folded_weights(model, description, candidates, path))
    edit = ModelEdit(model)
    try:
        model.eval()
        for conv, bn in description.get("fused", []):
            edit.folds.append(fold(model, conv, bn))
        layers = {n: candidates[n] for n in description["layers"]}
        attach_quantizers(
            model, layers, {n for n, d in description["layers"].items() if d.get("functional")}, cfg, edit
        )
        load_float_params(model, path, description, edit)
        apply_records(edit.quantizers, records)
        set_quantization(edit.quantizers, True)
    except BaseException:
        edit.restore()
        raise
    model.__dict__["_jaxq_edit"] = edit  # bridge.restore_model(model) undoes the load
    return model


def restore_model(model: nn.Module) -> nn.Module:
    """Undo `load_quantized`: the float model as it was before the load."""
    edit = model.__dict__.pop("_jaxq_edit", None)
    if edit is None:
        raise ValueError("this model was not quantized by bridge.load_quantized")
    return edit.restore()
