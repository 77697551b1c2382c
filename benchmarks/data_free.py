"""Data-free EfficientNet-Lite0: which virtual data calibrates best without a single photo.

    python benchmarks/data_free.py
    python benchmarks/data_free.py --kinds bn_stats genie --seeds 0 1 2 --steps 200
    python benchmarks/data_free.py --fields '{"w_bit": 4, "keep_acc": {"adaround": [true, 1000]}}'

`QuantConfig(input_shape=[N, 3, 224, 224], virtual_data=kind, virtual_steps=steps, seed=s)`
with the histogram observer and the first and last layer quantized unless `--fields` says
otherwise; evaluated on
the EfficientNet-Lite0 protocol's held-out crops (agreement with the float model's top-1
and KL of its softmax). Kinds: `uniform` (msModelSlim's `torch.rand` sample), `bn_stats`
(ZeroQ's pixels matched to the BatchNorm statistics), `genie` (Genie's generator and
latents). Each row: mean ± std over `--seeds`, and the seconds of one run (distillation
included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="*", default=["uniform", "bn_stats", "genie"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=200, help="virtual_steps")
    ap.add_argument("--samples", type=int, default=8, help="the batch dimension of input_shape")
    ap.add_argument("--fields", default="{}", help="more QuantConfig fields, as JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = json.loads(args.fields)
    p = protocols.efficientnet_lite0()
    print(f"data-free EfficientNet-Lite0, input_shape [{args.samples}, 3, 224, 224], {args.steps} steps, {fields}")
    print(f"{'virtual_data':<13}{'agreement':>20}{'KL':>20}{'s per run':>11}")
    for kind in args.kinds:
        agreement, kl, seconds = [], [], []
        for seed in args.seeds:
            settings = dict(act_method=2, quantize_first_last=True, virtual_steps=args.steps, seed=seed) | fields
            cfg = jaxq.QuantConfig(input_shape=[args.samples, 3, 224, 224], virtual_data=kind, **settings)
            t = time.perf_counter()
            cal = Calibrator(p.make_model(), cfg, progress=False).run()
            seconds.append(time.perf_counter() - t)
            m = p.evaluate(cal.model)
            agreement.append(m["agreement"])
            kl.append(m["kl"])
        print(f"{kind:<13}{_mean_std(agreement):>20}{_mean_std(kl):>20}{statistics.mean(seconds):>11.1f}", flush=True)


if __name__ == "__main__":
    main()
