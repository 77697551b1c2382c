"""Streaming weight-only W4 of transformer-shaped checkpoints (random BF16 weights).

Per size (Llama-shaped: embeddings and lm_head kept, q/k/v/o and MLP projections
quantized per group of 128) and method: wall time and peak resident memory of a fresh
process running `quantize_checkpoint` with a fixed memory budget; the checkpoint is
written once to `--dir` (100M ≈ 0.24 GB, 300M ≈ 0.64 GB, 1B ≈ 1.9 GB on disk).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {"100M": (768, 2048, 10), "300M": (1024, 2816, 20), "1B": (2048, 5632, 16)}  # hidden, intermediate, layers
VOCAB = 32000


def tensors_of(hidden: int, inter: int, layers: int):
    yield "model.embed_tokens.weight", (VOCAB, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{name}.weight", (hidden, hidden)
        yield f"{p}.mlp.gate_proj.weight", (inter, hidden)
        yield f"{p}.mlp.up_proj.weight", (inter, hidden)
        yield f"{p}.mlp.down_proj.weight", (hidden, inter)
        yield f"{p}.input_layernorm.weight", (hidden,)
        yield f"{p}.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (VOCAB, hidden)


def write_checkpoint(path: Path, hidden: int, inter: int, layers: int) -> int:
    from bridge.weights_only.safetensors_io import OutTensor, ShardFile

    specs = list(tensors_of(hidden, inter, layers))
    shard = ShardFile(path, [OutTensor(n, "BF16", s) for n, s in specs])
    rng = np.random.default_rng(0)
    for name, shape in specs:
        rows = shape[0]
        step = max(1, (1 << 24) // int(np.prod(shape[1:]) or 1))
        for r in range(0, rows, step):
            block = (rng.standard_normal((min(step, rows - r),) + shape[1:], np.float32) * 0.02).view(np.uint32)
            shard.write(name, r, (block >> 16).astype(np.uint16))
    shard.close()
    return sum(int(np.prod(s)) for _, s in specs)


CHILD = """
import json, resource, sys, time
from bridge.weights_only import quantize_checkpoint
src, out, method, budget = sys.argv[1:5]
t = time.perf_counter()
quantize_checkpoint(src, out, bits=4, method=method, group_size=128, memory_budget_mib=int(budget),
                    shard_size_mib=512, progress=False)
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mib": peak_mib}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    ap.add_argument("--methods", nargs="*", default=["rtn", "admm"])
    ap.add_argument("--budget", type=int, default=256, help="MiB")
    ap.add_argument("--dir", default="/tmp/jaxq_weights_only_bench")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        src = root / f"{size}.safetensors"
        if not src.exists():
            params = write_checkpoint(src, *SIZES[size])
        else:
            params = sum(int(np.prod(s)) for _, s in tensors_of(*SIZES[size]))
        for method in args.methods:
            out = root / f"{size}-{method}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            t = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), str(out), method, str(args.budget)],
                capture_output=True,
                text=True,
            )
            if res.returncode:
                print(res.stderr[-2000:])
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((size, params, method, r["seconds"], time.perf_counter() - t, r["peak_mib"]))
            subprocess.run(["rm", "-rf", str(out)], check=True)
    print("| checkpoint | parameters | method | quantize (s) | process (s) | peak RSS (MiB) | budget (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for size, params, method, q, p, rss in rows:
        print(f"| {size} | {params / 1e6:.0f} M | {method} | {q:.1f} | {p:.1f} | {rss:.0f} | {args.budget} |")


if __name__ == "__main__":
    main()
