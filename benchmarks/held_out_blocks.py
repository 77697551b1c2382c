"""Block reconstruction with and without held-out calibration images (`recon_holdout`).

    python benchmarks/held_out_blocks.py                       # MiniLM W4A8 QDrop
    python benchmarks/held_out_blocks.py --models minilm efficientnet_lite0_unseen --holdouts 0 0.25

Each row is one `Calibrator(...)` + `run()` (QDrop, 300 steps per block, bias correction on,
first and last layer float) on the protocol's calibration data, evaluated on data it never
saw (MiniLM: 256 other passages; EfficientNet-Lite0: crops of three other photos). The
per-block columns come from `Calibrator.reports["blocks"]`: the blocks that kept learned
codes, the mean share of hard rounding variables in the kept states, and the mean ratio of
held-out to fitted block-output error (how much a block fits its own samples better).
"""

from __future__ import annotations

import argparse
import math
import statistics

import jaxq
from bridge.evaluation import protocols
from common import parse_args, timed_calibration

KEY = {"efficientnet_lite0_unseen": ("agreement", "kl"), "minilm": ("mean_cos", "min_cos")}


def _block_columns(blocks) -> str:
    kept = [b for b in blocks if b.kept]
    hard = statistics.mean(b.hard_share for b in kept) if kept else float("nan")
    gaps = [b.gap for b in blocks if not math.isnan(b.gap)]
    gap = statistics.mean(gaps) if gaps else float("nan")
    steps = statistics.mean(b.kept_step for b in kept) if kept else float("nan")
    return f"{len(kept):>4}/{len(blocks):<4}{hard:>7.2f}{steps:>8.0f}{gap:>8.2f}"


def main(argv=None):
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--holdouts", type=float, nargs="*", default=[0.0, 0.25])
    extra.add_argument("--steps", type=int, default=300)
    known, rest = extra.parse_known_args(argv)
    args = parse_args(__doc__, ["minilm"], rest)
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        keys = KEY[name]
        print(f"\n{name}, W4A8 QDrop {known.steps} steps/block")
        print(
            f"{'holdout':<9}"
            + "".join(f"{k:>10}" for k in keys)
            + f"{'run s':>8}{'kept':>10}{'hard':>7}{'step':>8}{'gap':>8}"
        )
        for holdout in known.holdouts:
            cfg = jaxq.QuantConfig(
                w_bit=4, a_bit=8, quant_mode=1, keep_acc={"qdrop": [True, known.steps]}, recon_holdout=holdout
            )
            cal, seconds, _ = timed_calibration(p, cfg)
            m = p.evaluate(cal.model)
            print(
                f"{holdout:<9}"
                + "".join(f"{m[k]:>10.4f}" for k in keys)
                + f"{seconds:>8.0f}  "
                + _block_columns(cal.reports["blocks"]),
                flush=True,
            )


if __name__ == "__main__":
    main()
