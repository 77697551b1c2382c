"""Block reconstruction with the last steps' rounding held hard (`recon_hard_final`).

    python benchmarks/hard_rounding.py                         # MiniLM W4A8 QDrop, 0 vs 0.2
    python benchmarks/hard_rounding.py --models efficientnet_lite0_unseen --hard-finals 0 0.2

Each row is one `Calibrator(...)` + `run()` (QDrop, 300 steps per block, bias correction on,
first and last layer float) on the protocol's calibration data, evaluated on data it never
saw (MiniLM: 256 other passages; EfficientNet-Lite0: crops of three other photos). `hard`:
the mean share of rounding variables exactly 0 or 1 in the blocks' kept states (what
rounding at ½ changes after the fit is the rest); `kept`: blocks whose learned codes were
kept.
"""

from __future__ import annotations

import argparse
import statistics

import jaxq
from bridge.evaluation import protocols
from common import parse_args, timed_calibration
from held_out_blocks import KEY


def main(argv=None):
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--hard-finals", type=float, nargs="*", default=[0.0, 0.2])
    extra.add_argument("--steps", type=int, default=300)
    extra.add_argument("--w-bit", type=int, default=4)
    known, rest = extra.parse_known_args(argv)
    args = parse_args(__doc__, ["minilm"], rest)
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        keys = KEY[name]
        print(f"\n{name}, W{known.w_bit}A8 QDrop {known.steps} steps/block")
        print(f"{'hard_final':<11}" + "".join(f"{k:>10}" for k in keys) + f"{'run s':>8}{'kept':>10}{'hard':>7}")
        for share in known.hard_finals:
            cfg = jaxq.QuantConfig(
                w_bit=known.w_bit,
                a_bit=8,
                quant_mode=1,
                keep_acc={"qdrop": [True, known.steps]},
                recon_hard_final=share,
            )
            cal, seconds, _ = timed_calibration(p, cfg)
            m = p.evaluate(cal.model)
            blocks = cal.reports["blocks"]
            kept = [b for b in blocks if b.kept]
            hard = statistics.mean(float(b.hard_share) for b in kept) if kept else float("nan")
            print(
                f"{share:<11}"
                + "".join(f"{m[k]:>10.4f}" for k in keys)
                + f"{seconds:>8.0f}  {len(kept):>4}/{len(blocks):<4}{hard:>7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
