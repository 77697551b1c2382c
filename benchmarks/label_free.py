"""Label-free calibration: accuracy, calibration time vs. the FP32 forward floor, compiles."""

from __future__ import annotations

import jaxq
from bridge.evaluation import protocols
from common import parse_args, timed_calibration

CONFIGS = {
    "W8A8 min-max": jaxq.QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True),
    "W8A8 sigma=25": jaxq.QuantConfig(quant_mode=1, act_method=0, quantize_first_last=True),
    "W8A8 hist+BC": jaxq.QuantConfig(quant_mode=1, act_method=2, quantize_first_last=True, bias_correction=True),
}


def main(argv=None):
    args = parse_args(__doc__, list(protocols.PROTOCOLS), argv)
    header = f"{'model':<20} {'config':<15} {'metric':<34} {'FP32':<22} {'fp fwd s':>8} {'cold s':>7} {'warm s':>7} {'warm/fp':>7} {'compiles':>9}"  # noqa: E501 (a table row)
    print(header)
    print("-" * len(header))
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        floor = p.fp_forward_seconds()
        for label, cfg in CONFIGS.items():
            _, cold, cold_compiles = timed_calibration(p, cfg)
            cal, warm, warm_compiles = timed_calibration(p, cfg)
            metric = ", ".join(f"{k}={v:.4f}" for k, v in p.evaluate(cal.model).items())
            ref = ", ".join(f"{k}={v:.4f}" for k, v in p.reference.items())
            print(
                f"{name:<20} {label:<15} {metric:<34} {ref:<22} {floor:>8.2f} {cold:>7.2f} {warm:>7.2f} "
                f"{warm / floor:>7.2f} {cold_compiles:>4}/{warm_compiles:<4}",
                flush=True,
            )


if __name__ == "__main__":
    main()
