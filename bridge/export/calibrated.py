"""The exports of a calibrated model (`bridge.calibrated.Calibrated`), each a view of its
parameter records.

    export_param  safetensors + JSON + manifest (+ msModelSlim `.npy`)   `bridge.export.files`
    export_w8a8   msModelSlim's W8A8 deployment layout                  `bridge.export.w8a8`
    export_onnx   ONNX QDQ (or Ascend) graph                            `bridge.export.onnx`
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from bridge.calibrated import Calibrated
from bridge.capture.data import as_batch
from bridge.export.files import ExportError, write_params, write_w8a8
from bridge.export.float_state import float_state


def config_dict(cfg) -> dict:
    """The config as JSON-ready values."""
    out = dataclasses.asdict(cfg)
    out["keep_acc"] = cfg.keep_acc.as_dict()
    return out


def model_fingerprint(records: dict, float_tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over every record and float tensor: equal for exports of the same model."""
    h = hashlib.sha256()
    for name in sorted(records):
        for field in dataclasses.fields(records[name]):
            value = getattr(records[name], field.name)
            h.update(f"{name}.{field.name}={value if value is None or isinstance(value, bool) else ''}".encode())
            if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
                h.update(np.ascontiguousarray(value).tobytes())
    for key in sorted(float_tensors):
        h.update(key.encode())
        h.update(np.ascontiguousarray(float_tensors[key]).tobytes())
    return h.hexdigest()


def fingerprint_of(cal: Calibrated) -> str:
    return model_fingerprint(cal.records, float_state(cal.model))


def export_param(cal: Calibrated, path, legacy: bool = False) -> list:
    check_unrotated(cal, "export_param")
    if legacy:
        check_per_channel(cal, "msModelSlim's legacy .npy dicts")
    params = cal.params()
    floats = float_state(cal.model)
    return write_params(
        path,
        params,
        cal.layer_descriptions(),
        config_dict(cal.cfg),
        legacy=legacy,
        fused=cal.fused,
        float_tensors=floats,
        model=model_fingerprint(cal.records, floats),
    )


def _float_tensors(model, layers) -> dict:
    out = {}
    for key, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(key.startswith(f"{n}.") for n in layers):
            continue
        out[key] = t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
    return out


def export_w8a8(cal: Calibrated, output_path, safetensors_name: str | None, json_name: str | None) -> list:
    from bridge.export.w8a8 import check_exportable, layer_tensors

    cfg = cal.cfg
    check_exportable(cfg.w_sym, cfg.w_bit, cfg.a_bit, cfg.act_quant, cfg.w_signed)
    check_unrotated(cal, "msModelSlim's W8A8 layout")
    check_uniform_8bit(cal, "the W8A8 export")
    check_per_channel(cal, "msModelSlim's W8A8 layout")
    check_unsmoothed(cal, "msModelSlim's W8A8 layout")
    safetensors_name = safetensors_name or "quant_model_weight_w8a8.safetensors"
    json_name = json_name or "quant_model_description_w8a8.json"
    if safetensors_name == json_name:
        raise ExportError(
            f"safetensors_name and json_name are both {json_name!r}; the JSON would overwrite the weights"
        )
    records, layers = cal.records, cal.quantizers
    tensors, kinds = {}, {}
    for name, q in layers.items():
        rec = records[name]
        bias = q.corrected_bias()
        t = layer_tensors(
            name,
            rec.codes,
            rec.weight_scale,
            None if bias is None else bias.detach().float().cpu().numpy(),
            float(rec.input_scale),
            int(rec.input_offset),
            cfg.a_signed,
        )
        tensors.update(t)
        kinds.update({k: "W8A8" for k in t})
    for key, value in _float_tensors(cal.model, layers).items():
        tensors[key] = value
        kinds[key] = "FLOAT"
    description = {"model_quant_type": "W8A8", **dict(sorted(kinds.items()))}
    return write_w8a8(output_path, tensors, description, safetensors_name, json_name, model=fingerprint_of(cal))


def check_uniform_8bit(cal: Calibrated, what: str) -> None:
    """`ExportError` naming the layers whose `layer_bits` or `layer_act_bits` are not 8 (8-bit-only formats)."""
    cfg = cal.cfg
    for field, kind, bits_for in (
        ("layer_bits", "weight", cfg.weight_bits_for),
        ("layer_act_bits", "input", cfg.act_bits_for if cfg.act_quant else lambda n: 8),
    ):
        other = {n: bits_for(n) for n in cal.quantizers if bits_for(n) != 8}
        if other:
            shown = ", ".join(f"{n!r}: {b}" for n, b in list(other.items())[:4])
            raise ExportError(
                f"{what} holds 8-bit {kind} codes; {field} gives {len(other)} layer(s) other widths "
                f"({shown}{'…' if len(other) > 4 else ''}); use export_param for mixed precision"
            )


def _shown(names: list) -> str:
    """The first three layer names, and an ellipsis if there are more."""
    return f"{names[:3]}{'…' if len(names) > 3 else ''}"


def check_per_channel(cal: Calibrated, what: str) -> None:
    """`ExportError` naming the layers with a weight scale per group of input columns
    (`QuantConfig.w_group_size`) for formats that hold one scale per output channel."""
    grouped = [n for n, q in cal.quantizers.items() if q.weight_group is not None]
    if grouped:
        raise ExportError(
            f"{what} holds one weight scale per output channel; {len(grouped)} layer(s) have one per group "
            f"of {cal.cfg.w_group_size} input columns ({_shown(grouped)}); "
            "use export_param, or calibrate with w_group_size=None"
        )


def check_unsmoothed(cal: Calibrated, what: str) -> None:
    """`ExportError` naming the layers with SmoothQuant factors (formats with no place for them)."""
    smoothed = [n for n, r in cal.records.items() if r.smoothing is not None]
    if smoothed:
        raise ExportError(
            f"{what} has no place for SmoothQuant factors; {len(smoothed)} layer(s) have them "
            f"({_shown(smoothed)}); use export_param or the standard ONNX "
            "QDQ export (the division by s is a node before the input's QuantizeLinear), or calibrate "
            "with smooth_quant=None"
        )


def check_unrotated(cal: Calibrated, what: str) -> None:
    """`ExportError` naming the layers whose inputs are rotated at run time
    (`QuantConfig.rotate_inputs`): their records are of `W·Q` and of `x·Q`, and no format
    carries `Q`, so a runtime reading them would compute the wrong function."""
    from bridge.inplace.rotation import rotation_of

    rotated = [n for n, q in cal.quantizers.items() if rotation_of(q.module) is not None]
    if rotated:
        raise ExportError(
            f"{what} has no place for input rotations; {len(rotated)} layer(s) rotate their inputs at run time "
            f"(QuantConfig.rotate_inputs=True: {_shown(rotated)}), and their weights and input scales are of the "
            "rotated tensors; use the quantized model in torch, or calibrate with rotate_inputs=False to export"
        )


def check_onnx_exportable(cfg, opset_version) -> None:
    if cfg.w_bit != 8 or (cfg.act_quant and cfg.a_bit != 8):
        raise ExportError(
            f"ONNX QuantizeLinear holds 8-bit codes; this calibration has w_bit={cfg.w_bit}, "
            f"a_bit={cfg.a_bit} (use export_param for other widths)"
        )
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or not 13 <= opset_version <= 23:
        raise ExportError(
            f"opset_version={opset_version!r}: the QDQ export needs an ONNX opset from 13 to 23 "
            "(per-channel DequantizeLinear); 18 is the default"
        )


def export_onnx(
    cal: Calibrated, model_arch, save_path, input_names, output_names, opset_version, example_batch, ascend
) -> list:
    from bridge.export.onnx import export_qdq

    check_onnx_exportable(cal.cfg, opset_version)
    check_unrotated(cal, "the ONNX export")
    check_uniform_8bit(cal, "ONNX QuantizeLinear")
    check_per_channel(cal, "the ONNX QDQ export (per-channel DequantizeLinear)")
    if ascend and not cal.cfg.w_sym:
        raise ExportError("the Ascend ONNX form needs symmetric weights (w_sym=True)")
    if ascend:
        check_unsmoothed(cal, "the Ascend ONNX form")
    batch = as_batch(example_batch if example_batch is not None else next(iter(cal.calib_data)), 0)
    return export_qdq(
        cal.model,
        batch,
        model_arch,
        save_path,
        input_names,
        output_names,
        opset_version,
        ascend=ascend,
        model_id=fingerprint_of(cal),
    )
