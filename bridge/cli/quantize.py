"""`jaxq quantize`: calibrate a model from the command line and write the chosen exports.

    jaxq quantize --model mypkg.models:build --calib-data calib.pt --config cfg.json \\
                  --export params w8a8 onnx --out out/

- `--model module:function` returns the float `nn.Module` (weights loaded).
- `--calib-data`: a `.pt` file (a tensor, or a list of batches: tensors, tuples or
  dicts; loaded with `weights_only=True`), a `.npy` file (an array split into batches of
  `--batch-size` along axis 0), a `.safetensors` file (every tensor one batch, in key
  order), or `module:function` returning the batches. Optional in data-free mode.
- `--config`: a JSON (or YAML, with PyYAML) object of `QuantConfig` fields; the flags
  `--w-bit`, `--a-bit`, `--act-method`, `--quant-mode`, `--input-shape`,
  `--quantize-all` override it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

EXPORTS = ("params", "legacy", "w8a8", "onnx")


class CLIError(ValueError):
    """A command-line argument cannot be used."""


def load_object(spec: str, what: str):
    """Call `module:function` (importable from the current directory) and return its result."""
    if ":" not in spec:
        raise CLIError(f"--{what}={spec!r} must be 'module:function'")
    module_name, func_name = spec.rsplit(":", 1)
    folder = Path.cwd()
    if "/" in module_name or module_name.endswith(".py"):  # a path: ./pkg, models/build.py
        path = Path(module_name)
        folder, module_name = (Path.cwd() / path).parent, path.stem if path.suffix == ".py" else path.name
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CLIError(f"--{what}={spec!r}: cannot import {module_name!r} ({e})") from e
    finally:
        sys.path.pop(0)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise CLIError(f"--{what}={spec!r}: {module_name!r} has no callable {func_name!r}")
    return func()


def load_calib_data(spec: str | None, batch_size: int):
    if spec is None:
        return None
    path = Path(spec)
    suffix = path.suffix.lower()
    if path.suffix and ":" not in spec and suffix not in (".pt", ".pth", ".npy", ".safetensors"):
        raise CLIError(
            f"--calib-data {spec!r}: files must be .pt, .pth, .npy or .safetensors (or give module:function)"
        )
    if suffix in (".pt", ".pth", ".npy", ".safetensors"):
        if not path.is_file():
            raise CLIError(f"--calib-data file {spec!r} does not exist")
        if suffix == ".npy":
            try:
                arr = torch.from_numpy(np.load(path, allow_pickle=False))
            except (ValueError, OSError, TypeError) as e:
                raise CLIError(
                    f"--calib-data {spec!r} is not a readable .npy array ({type(e).__name__}: {e})"
                ) from None
            return [arr[i : i + batch_size] for i in range(0, len(arr), batch_size)]
        if suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as e:
                raise CLIError(f"--calib-data {spec!r} is not a readable safetensors file ({e})") from None
            return [tensors[k] for k in sorted(tensors)]
        try:
            data = torch.load(path, weights_only=True)
        except Exception as e:  # pickle errors of every kind: name the file
            raise CLIError(
                f"--calib-data {spec!r} cannot be loaded safely ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        if isinstance(data, torch.Tensor):
            return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
        return data
    return load_object(spec, "calib-data")


def load_config(args) -> "jaxq.QuantConfig":  # noqa: F821
    import jaxq

    fields = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"--config file {args.config!r} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise CLIError("a YAML --config needs PyYAML (pip install pyyaml); or use JSON") from e
            try:
                fields = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise CLIError(f"--config {args.config!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        else:
            try:
                fields = json.loads(text)
            except ValueError as e:
                raise CLIError(f"--config {args.config!r} is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise CLIError(f"--config {args.config!r} must hold an object of QuantConfig fields")
    for flag, field in (
        ("w_bit", "w_bit"),
        ("a_bit", "a_bit"),
        ("act_method", "act_method"),
        ("quant_mode", "quant_mode"),
    ):
        if getattr(args, flag) is not None:
            fields[field] = getattr(args, flag)
    if args.input_shape:
        try:
            fields["input_shape"] = [int(d) for d in args.input_shape.split(",")]
        except ValueError:
            raise CLIError(
                f"--input-shape {args.input_shape!r} must be comma-separated integers, e.g. 1,3,224,224"
            ) from None
    if args.quantize_all:
        fields["quantize_first_last"] = True
    if args.bias_correction is not None:
        fields["bias_correction"] = args.bias_correction
    unknown = set(fields) - {f for f in jaxq.QuantConfig.__dataclass_fields__}
    if unknown:
        raise CLIError(f"--config has unknown QuantConfig fields {sorted(unknown)}")
    return jaxq.QuantConfig(**fields)


def check_exports(exports: list[str], cfg) -> None:
    """Refuse, before calibrating, an export that cannot express `cfg`."""
    from bridge.export.calibrated import check_onnx_exportable
    from bridge.export.w8a8 import check_exportable

    try:
        other = [f"{pattern!r}: {bits}" for pattern, bits in cfg.layer_bits if bits != 8]
        if other and ({"w8a8", "onnx"} & set(exports)):
            raise ValueError(
                f"{sorted({'w8a8', 'onnx'} & set(exports))} hold 8-bit weight codes; layer_bits sets "
                f"{', '.join(other[:4])} (use --export params for mixed precision)"
            )
        if "w8a8" in exports:
            check_exportable(cfg.w_sym, cfg.w_bit, cfg.a_bit, cfg.act_quant, cfg.w_signed)
            if cfg.smooth_quant:
                raise ValueError(
                    f"w8a8: msModelSlim's W8A8 layout has no place for SmoothQuant factors "
                    f"(smooth_quant={cfg.smooth_quant!r}); drop smooth_quant or export params / onnx"
                )
        if "onnx" in exports:
            check_onnx_exportable(cfg, 18)
    except (ValueError, OSError) as e:
        raise CLIError(f"--export: {e}") from None


def run_quantize(args) -> int:
    from bridge import Calibrator

    exports = args.export or ["params"]
    bad = [e for e in exports if e not in EXPORTS]
    if bad:
        raise CLIError(f"--export {bad} not known; choose from {EXPORTS}")
    cfg = load_config(args)
    check_exports(exports, cfg)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size} must be ≥ 1")
    model = load_object(args.model, "model")
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"--model {args.model!r} returned {type(model).__name__}, not a torch.nn.Module")
    calib = load_calib_data(args.calib_data, args.batch_size)
    t0 = time.perf_counter()
    cal = Calibrator(model, cfg, calib, progress=not args.no_progress)
    cal.run()
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    files = []
    if "params" in exports or "legacy" in exports:
        files += cal.export_param(out, legacy="legacy" in exports)
    if "w8a8" in exports:
        files += cal.export_quant_safetensor(out)
    if "onnx" in exports:
        files += cal.export_quant_onnx(args.onnx_name, out)
    rows = [
        ("model", args.model),
        (
            "config",
            f"W{cfg.w_bit}A{cfg.a_bit if cfg.act_quant else '-'} quant_mode={cfg.quant_mode} "
            f"act_method={cfg.act_method}" + (" bias_correction" if cal.cfg.bias_correction else ""),
        ),
        (
            "quantized layers",
            f"{len(cal.quantized_names)} of {len(cal.all_layers) + len(cal.unsupported)} "
            f"(float: {sorted(cal.disabled) + sorted(cal.unsupported) or 'none'})",
        ),
        ("Conv+BN folded", str(len(cal.fused))),
        ("calibration time", f"{seconds:.2f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"{'written':<{width}}  " + f"\n{'':<{width}}  ".join(str(f) for f in files))
    if args.sensitivity:
        print()
        print(cal.sensitivity())
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser(
        "quantize",
        help="calibrate a model (module:function) and export it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--model", required=True, help="module:function returning the float nn.Module")
    q.add_argument("--calib-data", help=".pt/.npy/.safetensors file or module:function")
    q.add_argument("--batch-size", type=int, default=8, help="batch size when splitting one array/tensor")
    q.add_argument("--config", help="JSON/YAML object of QuantConfig fields")
    q.add_argument("--w-bit", type=int)
    q.add_argument("--a-bit", type=int)
    q.add_argument("--act-method", type=int)
    q.add_argument("--quant-mode", type=int)
    q.add_argument("--input-shape", help="data-free virtual input shape, e.g. 1,3,224,224")
    q.add_argument("--quantize-all", action="store_true", help="quantize the first and last layer too")
    q.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="correct each layer's bias for its weight rounding (default: on with real calibration "
        "data; --no-bias-correction for msModelSlim's arithmetic)",
    )
    q.add_argument("--export", nargs="*", help=f"any of {EXPORTS} (default: params)")
    q.add_argument("--onnx-name", default="model", help="file stem of the ONNX export")
    q.add_argument("--out", default="jaxq_out", help="output directory")
    q.add_argument("--sensitivity", action="store_true", help="print the per-layer sensitivity table")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=run_quantize)
