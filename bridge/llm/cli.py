"""`jaxq quantize-llm`: the command line of `bridge.llm.checkpoint.quantize_llm_checkpoint`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize-llm",
        help="GPTQ / AWQ / RTN of a decoder language model checkpoint, layer by layer from disk",
        description="Quantize a transformers decoder checkpoint directory (config.json + safetensors, Llama "
        "layout) one decoder layer at a time, calibrated on token ids, into a compressed-tensors checkpoint "
        "that transformers and vLLM load. Interrupted runs resume when started again with the same arguments.",
    )
    p.add_argument("checkpoint", help="directory with config.json and *.safetensors (or an index)")
    p.add_argument("--out", required=True, help="output directory (compressed-tensors checkpoint)")
    p.add_argument("--calib", required=True, help=".npy file of token ids [samples, sequence] (integers)")
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq", "awq+gptq"])
    p.add_argument("--bits", type=int, default=4, help="weight bits, 2–8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale (default 128); 0 = per channel")
    p.add_argument("--asymmetric", action="store_true", help="a zero point per group")
    p.add_argument("--act-bits", type=int, default=None, help="quantize Linear inputs to this many bits")
    p.add_argument("--act", choices=["dynamic", "static"], default="dynamic", help="with --act-bits (default dynamic)")
    p.add_argument("--batch-size", type=int, default=16, help="calibration sequences per forward")
    p.add_argument("--memory-budget", type=int, default=None, help="MiB; refused up front when one layer needs more")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def load_token_ids(path) -> "torch.Tensor":  # noqa: F821
    """Token ids `[samples, sequence]` from a `.npy` file (`ValueError` naming the file)."""
    import torch

    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"--calib {str(path)!r}: a .npy file of token ids [samples, sequence] is expected")
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--calib {str(path)!r} is not a readable .npy array: {e}") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0 or ids.min() < 0:
        raise ValueError(
            f"--calib {str(path)!r}: token ids [samples, sequence] of non-negative integers expected, "
            f"got {ids.dtype} {list(ids.shape)}"
        )
    return torch.from_numpy(ids.astype(np.int64))


def run(args: argparse.Namespace) -> int:
    from bridge.llm.checkpoint import quantize_llm_checkpoint
    from jaxq.llm import LlmConfig

    cfg = LlmConfig(
        method=args.method,
        w_bit=args.bits,
        group_size=args.group_size or None,
        w_sym=not args.asymmetric,
        a_bit=args.act_bits,
        activations=args.act if args.act_bits else None,
    )
    tokens = load_token_ids(args.calib)
    report = quantize_llm_checkpoint(
        args.checkpoint, args.out, tokens, cfg, args.batch_size, args.memory_budget, progress=not args.no_progress
    )
    resumed = f", resumed after layer {report['resumed_from']}" if report["resumed_from"] else ""
    print(f"{report['layers']} decoder layers quantized ({cfg.describe()}{resumed}); written to {args.out}")
    return 0
