"""What the unseen-photo protocol can show: round to nearest at 8, 6 and 4 bits.

    python benchmarks/protocol_ceiling.py
    python benchmarks/protocol_ceiling.py --subsets 1 2 3 --cases W8 W8A8 W4A8
    python benchmarks/protocol_ceiling.py --cases W4A8 --fields '{"smooth_quant": true}'

EfficientNet-Lite0 calibrated on 64 crops of the five calibration photos (crop seed =
subset) and evaluated on 128 crops of the three unseen photos and on 128 new crops of
the calibration photos (`reconstruction_data.py`'s sets). Round to nearest + bias
correction (the defaults), histogram activations, the papers' convention
(`quantize_first_last="8bit"`) unless the case says "all 4-bit". Nothing here learns from
the photos, so the unseen agreement of W8 weight-only is the ceiling that sampling noise
and near-tied crops leave any method on this protocol; rows: mean ± std over the subsets.
"""

from __future__ import annotations

import argparse
import json

import jaxq
from common import mean_std, photo_evaluation_sets
from bridge import Calibrator
from bridge.evaluation import metrics, zoo

EIGHT_BIT_ENDS = dict(quantize_first_last="8bit")
CASES = {
    "W8": dict(w_bit=8, act_quant=False, **EIGHT_BIT_ENDS),
    "W8A8": dict(w_bit=8, a_bit=8, **EIGHT_BIT_ENDS),
    "W6A8": dict(w_bit=6, a_bit=8, **EIGHT_BIT_ENDS),
    "W4A8": dict(w_bit=4, a_bit=8, **EIGHT_BIT_ENDS),
    "W4A8 w_sym=False": dict(w_bit=4, a_bit=8, w_sym=False, **EIGHT_BIT_ENDS),
    "W4A8 all 4-bit": dict(w_bit=4, a_bit=8, quantize_first_last=True),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subsets", type=int, nargs="*", default=[1, 2, 3], help="seeds of the calibration crops")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--fields", type=json.loads, default={}, help="more QuantConfig fields, as JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    sets = photo_evaluation_sets(args.threads)
    print(f"subsets {args.subsets}; round to nearest + bias correction, histogram activations {args.fields}")
    print(f"{'case':<20}{'unseen agreement':>18}{'unseen KL':>18}{'calib-photo agr.':>18}{'calib-photo KL':>18}")
    for case in args.cases:
        results = {k: [] for k in ("ua", "uk", "ca", "ck")}
        for subset in args.subsets:
            crops = zoo.image_crops(64, seed=subset, which=zoo.CALIBRATION_PHOTOS)
            cfg = jaxq.QuantConfig(quant_mode=1, act_method=2, **{**CASES[case], **args.fields})
            cal = Calibrator(zoo.efficientnet_lite0(), cfg, [crops[i : i + 8] for i in range(0, 64, 8)], progress=False)
            model = cal.run().model
            for key, name in (("u", "unseen"), ("c", "calib photos")):
                agree, kl = metrics.agreement_and_kl(sets[name][1], metrics.logits(model, sets[name][0]))
                results[key + "a"].append(agree)
                results[key + "k"].append(kl)
        print(f"{case:<20}" + "".join(f"{mean_std(results[k]):>18}" for k in ("ua", "uk", "ca", "ck")), flush=True)


if __name__ == "__main__":
    main()
