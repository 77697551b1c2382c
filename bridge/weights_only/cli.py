"""`jaxq quantize-weights`: the command line of `bridge.weights_only.quantize_checkpoint`."""

from __future__ import annotations

import argparse

from bridge.weights_only.quantize import WeightOnlyConfig


def add_parser(sub) -> None:
    d = WeightOnlyConfig()
    p = sub.add_parser(
        "quantize-weights",
        help="weight-only quantization of a safetensors checkpoint, streamed from disk",
        description="Quantize the Linear/Conv weights of a safetensors checkpoint (one file, a sharded "
        "*.safetensors.index.json, or a directory) without building the model. Interrupted "
        "runs resume when started again with the same arguments.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output directory (shards, index, description JSON)")
    p.add_argument("--bits", type=int, default=d.bits, help=f"2–8 (default {d.bits})")
    p.add_argument("--method", default=d.method, choices=["rtn", "admm", "squant"])
    p.add_argument(
        "--group-size",
        type=int,
        default=d.group_size,
        help=f"values per group (default {d.group_size}); 0 = per output channel",
    )
    p.add_argument("--asymmetric", action="store_true", help="min-max range with an offset instead of symmetric")
    p.add_argument("--include", nargs="*", default=list(d.include), help="glob patterns of tensors to quantize")
    p.add_argument("--exclude", nargs="*", default=list(d.exclude), help="glob patterns kept as they are")
    p.add_argument("--iters", type=int, default=d.iters, help="ADMM iterations per row block")
    p.add_argument("--memory-budget", type=int, default=None, help="MiB for the row blocks (default: RAM/8, ≤ 1 GiB)")
    p.add_argument("--shard-size", type=int, default=d.shard_size_mib, help="MiB per output shard")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bridge.weights_only.quantize import quantize_checkpoint

    cfg = WeightOnlyConfig(
        bits=args.bits,
        method=args.method,
        group_size=args.group_size or None,
        symmetric=not args.asymmetric,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        iters=args.iters,
        memory_budget_mib=args.memory_budget,
        shard_size_mib=args.shard_size,
    )
    description = quantize_checkpoint(args.checkpoint, args.out, cfg, progress=not args.no_progress)
    quantized = sum(1 for k in description if f"{k}_scale" in description)
    print(
        f"{quantized} tensors quantized to W{cfg.bits} ({cfg.method}, "
        f"{'per channel' if not cfg.group_size else f'groups of {cfg.group_size}'}); written to {args.out}"
    )
    return 0
