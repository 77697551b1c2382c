"""Mixed-precision weights from the JAX model (`bridge.jax_model.mixed_precision`).

Per model: the front over the first 10 calibration samples (weights at `--bits`,
activations 8-bit as calibrated, W8A8 default config), its wall time, then the protocol's
held-out metric of uniform W6A8 (round to nearest) and of the front's allocation at 6 bits
per weight, both calibrated through `QuantConfig(layer_bits=…)`; and the `amp_num=5`
fallback at W6A8 by each ranking (`amp_metric`; `--no-amp` skips it). `--w-range` is the
front's and the calibrations' `w_range` (default: the config's, searched at 4 bits).

    python benchmarks/mixed_precision.py --models efficientnet_lite0 --no-amp [--w-range minmax]
"""

from __future__ import annotations

import time

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols
from bridge.jax_model.mixed_precision import mixed_precision_front
from common import parse_args
from jaxq.weight_range import WEIGHT_RANGES


def main(argv=None):
    def extra(ap):
        ap.add_argument("--bits", default="4,6,8")
        ap.add_argument("--w-range", choices=WEIGHT_RANGES, default=None)
        ap.add_argument("--no-amp", action="store_true")

    args = parse_args(__doc__, ["efficientnet_lite0", "minilm"], argv, extra)
    bits = tuple(int(b) for b in args.bits.split(","))
    rows, amp_rows = [], []
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        calib = p.calib_data if name != "minilm" else p.calib_data[:16]
        cal = Calibrator(p.make_model(), jaxq.QuantConfig(w_bit=8, a_bit=8), calib, progress=False).run()
        qf = cal.jax_forward()
        t = time.perf_counter()
        front = mixed_precision_front(qf, cal.calibration_batches(10), bits=bits, w_range=args.w_range)
        seconds = time.perf_counter() - t
        print(f"{name}: front over {bits} in {seconds:.1f} s\n{front}\n")
        results = {}
        for label, layer_bits in (("uniform W6A8", None), ("mixed 6 bits/weight", front.layer_bits(6.0))):
            c = Calibrator(
                p.make_model(),
                jaxq.QuantConfig(w_bit=6, a_bit=8, layer_bits=layer_bits, w_range=args.w_range),
                p.calib_data,
                progress=False,
            ).run()
            results[label] = p.evaluate(c.model)
        rows.append((name, seconds, results))
        for metric in () if args.no_amp else ("mse", "relative_mse", "isolated"):
            for amp in (0, 5) if metric == "mse" else (5,):
                c = Calibrator(
                    p.make_model(),
                    jaxq.QuantConfig(w_bit=6, a_bit=8, amp_num=amp, amp_metric=metric),
                    p.calib_data,
                    progress=False,
                ).run()
                amp_rows.append((name, metric if amp else "-", amp, p.evaluate(c.model)))
    print("| model | front time (s) | uniform W6A8 | mixed, 6 bits/weight |")
    print("|---|---|---|---|")
    for name, seconds, r in rows:
        fmt = lambda m: ", ".join(f"{k} {v:.4f}" for k, v in m.items())  # noqa: E731
        print(f"| {name} | {seconds:.0f} | {fmt(r['uniform W6A8'])} | {fmt(r['mixed 6 bits/weight'])} |")
    print("\n| model | amp_metric | amp_num | metric (W6A8) |")
    print("|---|---|---|---|")
    for name, metric, amp, m in amp_rows:
        print(f"| {name} | {metric} | {amp} | " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + " |")


if __name__ == "__main__":
    main()
