"""What the result check at the end of `run()` costs (`bridge/output_check.py`: two
forwards of the first calibration sample, quantization on and off): its seconds against the
whole warm default `Calibrator(...).run()`, and the cosine it reports.

    python benchmarks/output_check_cost.py
    python benchmarks/output_check_cost.py --models efficientnet_lite0 vgg_unet --runs 5

Default `QuantConfig(quant_mode=1)` on each protocol's calibration data (docs/evaluation.md)
or the random-weight architectures' batches (`architectures.py`). Median of `--runs` warm
runs after one that compiles.
"""

from __future__ import annotations

import statistics
import time

import architectures
import bridge.calibrator as calibrator_module
from bridge import Calibrator
from bridge.evaluation import protocols
from common import parse_args
from jaxq import QuantConfig

MODELS = ["efficientnet_lite0", "minilm", "digits", *architectures.MODELS]


def main(argv=None):
    args = parse_args(__doc__, MODELS, argv, extra=lambda ap: ap.add_argument("--runs", type=int, default=3))
    check = calibrator_module.check_output
    spent: list[float] = []

    def timed(*a):
        t = time.perf_counter()
        out = check(*a)
        spent.append(time.perf_counter() - t)
        return out

    calibrator_module.check_output = timed
    print(f"{'model':<20}{'run s':>8}{'check ms':>10}{'share':>8}{'cosine':>9}")
    for name in args.models:
        if name in protocols.PROTOCOLS:
            p = protocols.PROTOCOLS[name]()
            model, data = p.make_model(), p.calib_data
        else:
            model, data = architectures.MODELS[name]()
        runs, spent[:] = [], []
        for _ in range(args.runs + 1):
            t = time.perf_counter()
            cal = Calibrator(model, QuantConfig(quant_mode=1), data, progress=False).run()
            runs.append(time.perf_counter() - t)
            cosine = cal.output_cosine
            cal.restore()
        run, chk = statistics.median(runs[1:]), statistics.median(spent[1:])
        print(f"{name:<20}{run:>8.3f}{chk * 1e3:>10.1f}{chk / run:>8.1%}{cosine:>9.4f}", flush=True)


if __name__ == "__main__":
    main()
