"""What reconstruction learns from: recon_rows and recon_augment, mean ± std over calibration subsets.

    python benchmarks/reconstruction_data.py
    python benchmarks/reconstruction_data.py --subsets 1 2 3 --cases 2048:0 2048:2 6144:0 --algo adaround
    python benchmarks/reconstruction_data.py --algo qdrop --cases 2048:0:0 2048:0:0.25
    python benchmarks/reconstruction_data.py --cases 2048:0:0:0 2048:0:0:32 --w-range minmax
    python benchmarks/reconstruction_data.py --algo adaround --cases 2048:0 --fields '{"w_sym": false}'

EfficientNet-Lite0 W4A8 histogram, `quantize_first_last="8bit"`, bias correction on. Each
calibration subset is 64 crops of the five calibration photos drawn with its own seed; every
case is evaluated on 128 crops of the three other photos (agreement / KL with the float
model) and on 128 new crops of the calibration photos, so the gap between the two shows
what reconstruction learned of the photos rather than of the model. Rows: mean ± std over
the subsets. A case is `recon_rows:recon_augment[:recon_holdout[:recon_synthetic]]`;
`--w-range` sets `w_range` (default: the config's, the searched range at 4 bits) and
`--recon-inputs` sets `recon_inputs` and `--virtual-steps` the distillation's Adam steps
(`virtual_steps`); `--algo rtn` is round to nearest. For block
reconstruction the table adds the blocks that kept learned codes and the mean share of hard rounding
variables in the kept states (`Calibrator.reports["blocks"]`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


import jaxq
from common import mean_std, photo_evaluation_sets
from bridge import Calibrator
from bridge.evaluation import metrics, zoo
from jaxq.config import RECON_INPUTS
from jaxq.weight_range import WEIGHT_RANGES

ALGOS = {"rtn": {}, "adaround": {"adaround": [True, 1000]}, "qdrop": {"qdrop": [True, 300]}, "gptq": {"gptq": True}}


def _evaluate(model, sets) -> dict:
    out = {}
    for name, (images, fp_logits) in sets.items():
        agree, kl = metrics.agreement_and_kl(fp_logits, metrics.logits(model, images))
        out[name] = (agree, kl)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subsets", type=int, nargs="*", default=[1, 2, 3], help="seeds of the calibration crops")
    ap.add_argument(
        "--cases",
        nargs="*",
        default=["2048:0", "2048:2", "6144:0"],
        help="recon_rows:recon_augment[:recon_holdout[:recon_synthetic]]",
    )
    ap.add_argument("--algo", choices=sorted(ALGOS), default="adaround")
    ap.add_argument("--w-range", choices=WEIGHT_RANGES, default=None)
    ap.add_argument("--recon-inputs", choices=RECON_INPUTS, default=jaxq.QuantConfig().recon_inputs)
    ap.add_argument("--virtual-steps", type=int, default=jaxq.QuantConfig().virtual_steps, help="distillation steps")
    ap.add_argument("--fields", type=json.loads, default={}, help="more QuantConfig fields, as JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    sets = photo_evaluation_sets(args.threads)
    settings = (
        f"w_range={args.w_range}, recon_inputs={args.recon_inputs}, virtual_steps={args.virtual_steps} {args.fields}"
    )
    print(f"{args.algo} W4A8, first/last 8 bit, {settings}; subsets {args.subsets}", flush=True)
    print(
        f"{'case':<14}{'unseen agreement':>18}{'unseen KL':>16}{'calib-photo agr.':>18}{'gap':>16}{'s':>7}"
        f"{'blocks kept':>13}{'hard':>7}"
    )
    for case in args.cases:
        parts = case.split(":")
        rows, augment = int(parts[0]), int(parts[1])
        holdout = float(parts[2]) if len(parts) > 2 else jaxq.QuantConfig().recon_holdout
        synthetic = int(parts[3]) if len(parts) > 3 else 0
        unseen_a, unseen_kl, seen_a, seconds, kept, hard = [], [], [], [], [], []
        for subset in args.subsets:
            crops = zoo.image_crops(64, seed=subset, which=zoo.CALIBRATION_PHOTOS)
            calib = [crops[i : i + 8] for i in range(0, 64, 8)]
            cfg = jaxq.QuantConfig(
                w_bit=4,
                a_bit=8,
                quant_mode=1,
                act_method=2,
                quantize_first_last="8bit",
                keep_acc=ALGOS[args.algo],
                recon_rows=rows,
                recon_augment=augment,
                recon_holdout=holdout,
                recon_synthetic=synthetic,
                virtual_steps=args.virtual_steps,
                w_range=args.w_range,
                recon_inputs=args.recon_inputs,
                **args.fields,
            )
            t = time.perf_counter()
            cal = Calibrator(zoo.efficientnet_lite0(), cfg, calib, progress=False).run()
            seconds.append(time.perf_counter() - t)
            result = _evaluate(cal.model, sets)
            unseen_a.append(result["unseen"][0])
            unseen_kl.append(result["unseen"][1])
            seen_a.append(result["calib photos"][0])
            blocks = cal.reports.get("blocks", [])
            kept += [sum(b.kept for b in blocks) / max(len(blocks), 1)]
            hard += [statistics.mean(b.hard_share for b in blocks if b.kept) if any(b.kept for b in blocks) else 1.0]
        gaps = [s - u for s, u in zip(seen_a, unseen_a)]
        print(
            f"{case:<14}{mean_std(unseen_a):>18}{mean_std(unseen_kl):>16}{mean_std(seen_a):>18}"
            f"{mean_std(gaps):>16}{statistics.mean(seconds):>7.0f}"
            + (f"{statistics.mean(kept):>13.0%}{statistics.mean(hard):>7.2f}" if kept and any(kept) else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
