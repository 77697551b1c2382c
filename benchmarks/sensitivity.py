"""AMP fallback: model metric after falling back the top-k layers by each ranking.

W4A8 (histogram activations, every layer quantized). Rankings from the first 10
calibration samples: msModelSlim's raw output MSE, relative MSE, isolated sensitivity
(a forward per layer), its Fisher estimate (one forward and one or two backward passes), and a
random control (mean over 5 random draws). Fallback is simulated by switching
the chosen layers' quantization off, which computes exactly what falling back does.
Then the metric-target search: the fewest layers (isolated ranking) to reach KL ≤ 2× the
W8A8 histogram KL on EfficientNet-Lite0.
"""

from __future__ import annotations

import random
import time

import jaxq
from bridge.evaluation import protocols
from bridge.inplace.fakequant import model_quantizers
from common import parse_args, timed_calibration

AMP = (0, 3, 5, 7)


def evaluate_with_float(p, cal, names):
    layers = model_quantizers(cal.model)
    for n, w in layers.items():
        w.quant_enabled = n not in names
    try:
        return p.evaluate(cal.model)
    finally:
        for w in layers.values():
            w.quant_enabled = True


def main(argv=None):
    args = parse_args(__doc__, ["efficientnet_lite0", "minilm"], argv)
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        key = "kl" if name == "efficientnet_lite0" else "mean_cos"
        cfg = jaxq.QuantConfig(
            quant_mode=1, act_method=2, quantize_first_last=True, w_bit=4, bias_correction=args.bias_correction
        )
        cal, _, _ = timed_calibration(p, cfg)
        seconds = {}
        for metric in ("isolated", "fisher"):
            t0 = time.perf_counter()
            cal.sensitivity(metrics=(metric,))
            seconds[metric] = time.perf_counter() - t0
        table = cal.sensitivity(metrics=("mse", "relative_mse", "isolated", "fisher"))
        bc = ", bias correction" if args.bias_correction else ""
        print(f"\n{name} W4A8 histogram{bc} — {key} after falling back k layers")
        print(f"{'ranking':<14}" + "".join(f"{'k=' + str(k):>10}" for k in AMP) + f"{'seconds':>10}")
        for metric in ("mse", "relative_mse", "isolated", "fisher"):
            order = table.ranked(metric)
            vals = [evaluate_with_float(p, cal, set(order[:k]))[key] for k in AMP]
            took = f"{seconds[metric]:>10.1f}" if metric in seconds else ""
            print(f"{metric:<14}" + "".join(f"{v:>10.4f}" for v in vals) + took, flush=True)
        rng = random.Random(0)
        names = list(model_quantizers(cal.model))
        rand = [sum(evaluate_with_float(p, cal, set(rng.sample(names, k)))[key] for _ in range(5)) / 5 for k in AMP]
        print(f"{'random (x5)':<14}" + "".join(f"{v:>10.4f}" for v in rand), flush=True)
        if name == "efficientnet_lite0":
            w8, _, _ = timed_calibration(p, cfg.replace(w_bit=8))
            target = 2 * p.evaluate(w8.model)["kl"]
            curve = cal.fallback_search(target=1e9)  # full curve on the first 10 samples, applies nothing
            order = curve.order
            k = next(
                (k for k in range(len(order) + 1) if evaluate_with_float(p, cal, set(order[:k]))["kl"] <= target), None
            )
            print(
                f"\ntarget KL ≤ {target:.4f} (2× W8A8 histogram): reached with {k} layers fallen back "
                f"(isolated ranking, evaluated on the 128 held-out crops): {order[:k] if k else []}"
            )


if __name__ == "__main__":
    main()
