"""Weight ranges below 8 bits: min-max against the range of least squared error (`w_range`).

Round to nearest + bias correction (the defaults), label-free, first and last layer float;
EfficientNet-Lite0 calibrated on 64 crops of five photos and evaluated on crops of the three
others, MiniLM on its protocol. Each row: the metric, and `run()`'s seconds on a warm
second calibration (median of `--repeats`) with and without the search.

    python benchmarks/weight_range.py
    python benchmarks/weight_range.py --models minilm --cases "W4A8" "W4 asym"
"""

from __future__ import annotations

import statistics

import jaxq
from bridge.evaluation import protocols
from common import parse_args, timed_calibration

CASES = {
    "W4A8": dict(w_bit=4, a_bit=8),
    "W4A8 asym": dict(w_bit=4, a_bit=8, w_sym=False),
    "W4 weight-only": dict(w_bit=4, act_quant=False),
    "W6A8": dict(w_bit=6, a_bit=8),
}
KEY = {"efficientnet_lite0_unseen": ("agreement", "kl"), "minilm": ("mean_cos", "min_cos")}


def main(argv=None):
    def extra(ap):
        ap.add_argument("--cases", nargs="*", default=list(CASES))
        ap.add_argument("--repeats", type=int, default=3)

    args = parse_args(__doc__, list(KEY), argv, extra)
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        keys = KEY[name]
        print(f"\n{name}")
        print(f"{'case':<16}{'w_range':<9}" + "".join(f"{k:>11}" for k in keys) + f"{'warm s':>8}")
        for case in args.cases:
            for w_range in ("minmax", "mse"):
                cfg = jaxq.QuantConfig(quant_mode=1, w_range=w_range, **CASES[case])
                cal, _, _ = timed_calibration(p, cfg)  # compiles
                m = p.evaluate(cal.model)
                warm = statistics.median(timed_calibration(p, cfg, include_setup=False)[1] for _ in range(args.repeats))
                print(
                    f"{case:<16}{w_range:<9}" + "".join(f"{m[k]:>11.4f}" for k in keys) + f"{warm:>8.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
