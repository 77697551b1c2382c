"""The `jaxq` console command.

    jaxq demo [--out DIR] [--w-bit 8] [--a-bit 8] [--act-method 1] [--legacy]
    jaxq quantize --model module:function [--calib-data FILE] [--config cfg.json] [--export …]

`quantize` is documented in `bridge.cli.quantize`. `demo` quantizes the embedded digits CNN
(trained on sklearn's real handwritten digits)
label-free, prints FP32 and quantized test accuracy, and writes the parameters.
"""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    from bridge import Calibrator
    from bridge.models.digits import accuracy, digits_split, load_digits_cnn
    from jaxq import QuantConfig

    cfg = QuantConfig(
        w_bit=args.w_bit,
        a_bit=args.a_bit,
        act_method=args.act_method,
        quant_mode=1,
        quantize_first_last=not args.keep_first_last,
    )
    model = load_digits_cnn()
    x_train, _, x_test, y_test = digits_split()
    calib = [x_train[i : i + 32] for i in range(0, args.calib_samples, 32)]
    fp_acc = accuracy(model, x_test, y_test)
    t0 = time.perf_counter()
    cal = Calibrator(model, cfg, calib, progress=not args.no_progress)
    cal.run()
    seconds = time.perf_counter() - t0
    q_acc = accuracy(cal.model, x_test, y_test)
    files = cal.export_param(args.out, legacy=args.legacy)
    rows = [
        ("model", "digits CNN (sklearn load_digits, 450 test images)"),
        ("config", f"W{cfg.w_bit}A{cfg.a_bit} label-free, act_method={cfg.act_method}"),
        ("quantized layers", f"{len(cal.quantized_names)} of {len(cal.specs)}"),
        ("FP32 test accuracy", f"{fp_acc:.2%}"),
        ("quantized test accuracy", f"{q_acc:.2%}  ({(q_acc - fp_acc) * 100:+.2f} points)"),
        ("calibration time", f"{seconds:.2f} s on {len(calib)} batches"),
        ("parameters written to", str(args.out)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for f in files:
        print(f"{'':<{width}}  - {f.name}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxq")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxq", description="JAX-backed post-training quantization for PyTorch models")
    p.add_argument("--version", action="version", version=f"jaxq {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize the embedded digits CNN and report accuracy")
    d.add_argument("--out", default="jaxq_demo_params", help="directory for the exported parameters")
    d.add_argument("--w-bit", type=int, default=8)
    d.add_argument("--a-bit", type=int, default=8)
    d.add_argument("--act-method", type=int, default=1, help="0 sigma, 1 min-max")
    d.add_argument("--calib-samples", type=_positive_int, default=256)
    d.add_argument("--keep-first-last", action="store_true", help="keep first/last layer float (msModelSlim default)")
    d.add_argument("--legacy", action="store_true", help="also write msModelSlim's .npy dicts")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_demo)
    from bridge.cli.quantize import add_parser
    from bridge.llm import cli as llm_cli
    from bridge.weights_only import cli as weights_only_cli

    add_parser(sub)
    weights_only_cli.add_parser(sub)
    llm_cli.add_parser(sub)
    return p


def _user_errors() -> tuple[type, ...]:
    """Exceptions that report a problem with the user's input: one line, no traceback."""
    import pickle

    errors = [
        ValueError,
        TypeError,
        OSError,
        NotImplementedError,
        RuntimeError,
        FloatingPointError,
        pickle.UnpicklingError,
        KeyError,
    ]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import yaml

        errors.append(yaml.YAMLError)
    except ImportError:  # yaml is optional
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"jaxq: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
