"""Peak memory of layer-by-layer quantization from disk (`jaxq quantize-llm`) against
loading the model and quantizing it in memory, on a generated Llama checkpoint several
times larger than the memory budget given to the streamed run.

Each run is a fresh process; its resident memory is read after the imports (baseline)
and its peak (`ru_maxrss`) after the run, with the mapped-file part of the largest
resident size sampled every 50 ms. The streamed checkpoint's logits are compared
with the in-memory result's.

    python benchmarks/llm_memory.py
    python benchmarks/llm_memory.py --layers 8 --hidden 1024 --budget 256
    python benchmarks/llm_memory.py --layers 48 --hidden 768 --budget 900 --modes stream
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _file_backed_at_peak(stop: threading.Event, out: dict) -> None:
    """Samples every 50 ms: the file-backed part (mapped files) of the largest RSS seen."""
    while not stop.wait(0.05):
        rss = _rss_mib()
        if rss > out.get("rss", 0.0):
            out["rss"], out["file"] = rss, _rss_mib("RssFile")


def _child(mode: str, src: str, out: str, budget: int) -> None:
    import numpy as np
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401 (imported before the baseline)

    from bridge.llm import quantize_decoder
    from bridge.llm.checkpoint import quantize_llm_checkpoint
    from jaxq.llm import LlmConfig

    torch.set_num_threads(2)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 128)))
    cfg = LlmConfig(method="gptq", w_bit=4, group_size=128)
    transformers.AutoConfig.from_pretrained(src)
    base = _rss_mib()
    sampled, stop = {}, threading.Event()
    threading.Thread(target=_file_backed_at_peak, args=(stop, sampled), daemon=True).start()
    t0, estimate = time.perf_counter(), None
    if mode == "stream":
        report = quantize_llm_checkpoint(src, out, tokens, cfg, memory_budget_mib=budget, progress=False)
        estimate = sum(report["estimate_mib"].values())
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        quantize_decoder(model, tokens, cfg, progress=False)
        torch.save({"logits": model(input_ids=tokens[:2]).logits.detach()}, Path(out) / "ref.pt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stop.set()
    seconds = time.perf_counter() - t0
    print(json.dumps({"baseline": base, "peak": peak, "seconds": seconds, "estimate": estimate, **sampled}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=400, help="MiB given to the streamed run")
    ap.add_argument("--modes", nargs="*", default=["stream", "memory"], choices=["stream", "memory"])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, src, out, budget = args.child
        return _child(mode, src, out, int(budget))
    import transformers

    work = Path(tempfile.mkdtemp(prefix="jaxq-llm-memory-"))
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4 // 128 * 128,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(work / "src")
    size = sum(p.stat().st_size for p in (work / "src").glob("*.safetensors")) / 2**20
    print(f"checkpoint {size:.0f} MiB ({args.layers} layers, hidden {args.hidden}); budget {args.budget} MiB")
    rows = {}
    for mode in args.modes:
        (work / mode).mkdir()
        cmd = [sys.executable, __file__, "--child", mode, str(work / "src"), str(work / mode), str(args.budget)]
        rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"{'run':<10}{'baseline MiB':>14}{'peak MiB':>10}{'growth MiB':>12}{'mapped files':>14}{'seconds':>9}")
    for mode, r in rows.items():
        growth = r["peak"] - r["baseline"]
        print(
            f"{mode:<10}{r['baseline']:>14.0f}{r['peak']:>10.0f}{growth:>12.0f}{r.get('file', 0):>14.0f}"
            f"{r['seconds']:>9.1f}"
        )
    if "memory" not in rows:
        return
    loaded = transformers.AutoModelForCausalLM.from_pretrained(work / "stream", dtype=torch.float32).eval()
    import numpy as np

    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 128)))
    with torch.no_grad():
        diff = (loaded(input_ids=tokens[:2]).logits - torch.load(work / "memory" / "ref.pt")["logits"]).abs().max()
    print(f"streamed checkpoint vs in-memory result: max |Δ logits| = {float(diff):.3g}")


if __name__ == "__main__":
    main()
