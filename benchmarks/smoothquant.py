"""SmoothQuant on MiniLM: every layer quantized, each activation observer, without
smoothing, with the paper's α = 0.5, and with α searched per layer group
(`smooth_quant=True`: 0.3 … 0.8 and no smoothing, by the layer group's quantized output
error). Mean / min cosine of sentence embeddings on the 256 held-out passages.

    python benchmarks/smoothquant.py                    # W8A8
    python benchmarks/smoothquant.py --w-bits 8 4
"""

from __future__ import annotations

import collections

import jaxq
from bridge.evaluation import protocols
from common import parse_args, timed_calibration

SETTINGS = {"none": None, "α 0.5": 0.5, "α searched": True}


def main(argv=None):
    def extra(ap):
        ap.add_argument("--w-bits", nargs="*", type=int, default=[8])
        ap.add_argument("--act-methods", nargs="*", type=int, default=[0, 1, 2])

    args = parse_args(__doc__, ["minilm"], argv, extra)
    print("| model | W/A | act_method | smoothing | mean cos | min cos | s | α chosen |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        p = protocols.PROTOCOLS[model]()
        for w_bit in args.w_bits:
            for act_method in args.act_methods:
                for label, sq in SETTINGS.items():
                    cfg = jaxq.QuantConfig(
                        w_bit=w_bit,
                        act_method=act_method,
                        quantize_first_last=True,
                        smooth_quant=sq,
                        bias_correction=args.bias_correction,
                    )
                    cal, seconds, _ = timed_calibration(p, cfg)
                    r = p.evaluate(cal.model)
                    chosen = collections.Counter(g["alpha"] for g in cal.reports.get("smooth_quant", {}).values())
                    shown = ", ".join(f"{a}×{c}" for a, c in sorted(chosen.items(), key=lambda kv: str(kv[0]))) or "—"
                    print(
                        f"| {model} | W{w_bit}A8 | {act_method} | {label} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | "
                        f"{seconds:.1f} | {shown} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
