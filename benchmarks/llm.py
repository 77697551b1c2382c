"""Perplexity of the embedded tiny Llama (`bridge.models.tiny_llama`) quantized layer by
layer: RTN, AWQ, GPTQ, AWQ+GPTQ and rotation, weight-only and with activations.

Calibration: 128 random 256-byte windows of the training text; evaluation: the first
128 consecutive windows of the held-out files (never seen in training or calibration).
The LM head stays float (as every tool does). Times are `quantize_decoder` alone (JAX's
compilation cache off: cold programs). Rows: `--cases` picks a subset.

    python benchmarks/llm.py
    python benchmarks/llm.py --cases w4a16 w3a16
"""

from __future__ import annotations

import argparse
import copy
import time

from common import parse_args

from bridge.llm import quantize_decoder
from bridge.models import tiny_llama
from jaxq.llm import LlmConfig

W4 = dict(w_bit=4, group_size=128)
W3 = dict(w_bit=3, group_size=128)
CASES = {
    "w4a16": [LlmConfig(method=m, **W4) for m in ("rtn", "awq", "gptq", "awq+gptq")]
    + [LlmConfig(method="gptq", rotate=True, online_hadamard=False, **W4)],
    "w3a16": [LlmConfig(method=m, **W3) for m in ("rtn", "awq", "gptq", "awq+gptq")]
    + [LlmConfig(method="gptq", rotate=True, online_hadamard=False, **W3)],
    "w8a8": [LlmConfig(method="rtn", w_bit=8, group_size=None, a_bit=8, activations=a) for a in ("static", "dynamic")],
    "w4a8": [LlmConfig(method=m, a_bit=8, activations="dynamic", **W4) for m in ("rtn", "gptq")],
    "w4a4": [
        LlmConfig(method=m, w_bit=4, group_size=None, a_bit=4, activations="dynamic", rotate=r)
        for m in ("rtn", "gptq")
        for r in (False, True)
    ],
}


def main(argv=None):
    def extra(ap: argparse.ArgumentParser):
        ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
        ap.add_argument("--calib", type=int, default=128, help="calibration windows")
        ap.add_argument("--eval", type=int, default=128, help="held-out windows")

    args = parse_args(__doc__, [], argv, extra)
    float_model = tiny_llama.load_tiny_llama()
    calib = tiny_llama.calibration_windows(args.calib)
    held_out = tiny_llama.eval_windows(args.eval)
    fp = tiny_llama.perplexity(float_model, held_out)
    print(f"tiny Llama {sum(p.numel() for p in float_model.parameters()) / 1e6:.2f} M parameters; "
          f"held-out perplexity FP32 {fp:.4f} ({args.eval} windows of 256 bytes)")  # fmt: skip
    print(f"{'config':<34}{'perplexity':>11}{'Δ vs FP32':>11}{'seconds':>9}")
    for case in args.cases:
        for cfg in CASES[case]:
            model = copy.deepcopy(float_model)
            t0 = time.perf_counter()
            quantize_decoder(model, calib, cfg, progress=False)
            seconds = time.perf_counter() - t0
            ppl = tiny_llama.perplexity(model, held_out)
            print(f"{cfg.describe():<34}{ppl:>11.4f}{ppl - fp:>+11.4f}{seconds:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
