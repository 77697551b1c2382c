"""Accuracy keeping: RTN vs ADMM, SQuant, EasyQuant, AdaRound and combinations.

For each model and weight width (histogram activations at 8 bits, every layer quantized):
the model metric, the total relative weight MSE Σ‖Ŵ − W‖² / Σ‖W‖², the time of the
algorithm itself (row sampling included for EasyQuant / AdaRound / GPTQ) and the compilations
of a cold run. Default iteration counts: ADMM 1000, EasyQuant 100 candidates, AdaRound
1000 steps per layer, BRECQ / QDrop 300 steps per block. `--models efficientnet_lite0_unseen`:
calibrated on crops of five photos, evaluated on crops of the three others (for the
methods that learn from the calibration data).

    python benchmarks/accuracy_keeping.py --models efficientnet_lite0 --bits 4 --algos rtn adaround
    python benchmarks/accuracy_keeping.py --bias-correction      # every algorithm + bias correction
"""

from __future__ import annotations

import torch

import jaxq
from bridge.evaluation import protocols
from bridge.inplace.fakequant import model_quantizers
from common import parse_args, timed_calibration

ALGOS = {
    "rtn": {},
    "admm": {"admm": [True, 1000]},
    "squant": {"round_opt": True},
    "easy_quant": {"easy_quant": [True, 100]},
    "adaround": {"adaround": [True, 1000]},
    "gptq": {"gptq": True},
    "admm+squant": {"admm": [True, 1000], "round_opt": True},
    "admm+easy_quant+adaround": {"admm": [True, 1000], "easy_quant": [True, 100], "adaround": [True, 1000]},
    "brecq": {"brecq": [True, 300]},
    "qdrop": {"qdrop": [True, 300]},
}
KEY = {
    "efficientnet_lite0": ("kl", "agreement"),
    "efficientnet_lite0_unseen": ("kl", "agreement"),
    "minilm": ("mean_cos", "min_cos"),
    "digits": ("top1",),
}


def weight_mse(cal) -> float:
    num = den = 0.0
    with torch.no_grad():
        for w in model_quantizers(cal.model).values():
            num += float(torch.sum((w.fake_quant_weight() - w.float_weight) ** 2))
            den += float(torch.sum(w.float_weight**2))
    return num / den


def algorithm_seconds(cal) -> float:
    t = cal.timings
    extra = sum(v for k, v in t.items() if k not in ("activations_s", "weights_s"))
    return extra + (t["weights_s"] if cal.cfg.keep_acc.admm is not None else 0.0)


def main(argv=None):
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--bits", nargs="*", type=int, default=[8, 6, 4])
    extra.add_argument("--algos", nargs="*", default=list(ALGOS))
    known, rest = extra.parse_known_args(argv)
    args = parse_args(__doc__, ["efficientnet_lite0", "minilm"], rest)
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        keys = KEY[name]
        print(f"\n{name} (A8 histogram, every layer{', bias correction' if args.bias_correction else ''})")
        print(
            f"{'W':>3} {'algorithm':<22}"
            + "".join(f"{k:>11}" for k in keys)
            + f"{'w-MSE':>11}{'algo s':>9}{'compiles':>9}"
        )
        for bits in known.bits:
            for algo in known.algos:
                cfg = jaxq.QuantConfig(
                    w_bit=bits,
                    quant_mode=1,
                    act_method=2,
                    quantize_first_last=True,
                    keep_acc=ALGOS[algo],
                    bias_correction=args.bias_correction,
                )
                cal, _, compiles = timed_calibration(p, cfg)
                m = p.evaluate(cal.model)
                print(
                    f"{bits:>3} {algo:<22}"
                    + "".join(f"{m[k]:>11.4f}" for k in keys)
                    + f"{weight_mse(cal):>11.3e}{algorithm_seconds(cal):>9.1f}{compiles:>9}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
