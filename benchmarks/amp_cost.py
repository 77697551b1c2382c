"""What `amp_num=5` costs and keeps, by ranking: the whole `Calibrator(...).run()` with
`amp_num=0`, with `amp_num=5` ranked by `"isolated"` (a forward per layer) and by
`"fisher"` (its second-order estimate: one forward and one backward pass per batch, two
where the output is not logits).

    python benchmarks/amp_cost.py                          # EfficientNet-Lite0, MiniLM, three architectures
    python benchmarks/amp_cost.py --models efficientnet_lite0 --w-bit 6
    python benchmarks/amp_cost.py --rankings fisher           # the default ranking only

Default W8A8 config (`--w-bit` changes the weight bits). Each cell: median of `--runs` warm
runs in one process (a fresh `Calibrator` on the restored model each time; one cold run of
each setting first). Protocol models add the held-out metric of the fallen-back model and
the layers both rankings fall back.
"""

from __future__ import annotations

import statistics
import time
import warnings

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols
from common import parse_args

SETTINGS = {"amp_num=0": {}, "isolated": {"amp_num": 5, "amp_metric": "isolated"}}
SETTINGS["fisher"] = {"amp_num": 5, "amp_metric": "fisher"}


def _model_and_data(name):
    if name in protocols.PROTOCOLS:
        p = protocols.PROTOCOLS[name]()
        return p.make_model(), p.calib_data, p
    from architectures import MODELS

    model, data = MODELS[name]()
    return model, data, None


def main(argv=None) -> None:
    def extra(ap):
        ap.add_argument("--runs", type=int, default=3)
        ap.add_argument("--w-bit", type=int, default=8)
        ap.add_argument("--rankings", nargs="*", default=["isolated", "fisher"], choices=["isolated", "fisher"])

    warnings.simplefilter("ignore")
    args = parse_args(__doc__, ["efficientnet_lite0", "minilm", "pnet", "efficientnet_260", "vgg_unet"], argv, extra)
    print(f"W{args.w_bit}A8 defaults; seconds = median of {args.runs} warm runs; ratio to amp_num=0")
    for name in args.models:
        model, data, protocol = _model_and_data(name)
        seconds, chosen, metric = {}, {}, {}
        settings = {k: v for k, v in SETTINGS.items() if k == "amp_num=0" or k in args.rankings}
        for label, fields in settings.items():
            cfg = jaxq.QuantConfig(w_bit=args.w_bit, **fields)
            times = []
            for run in range(args.runs + 1):
                t0 = time.perf_counter()
                cal = Calibrator(model, cfg, data, progress=False).run()
                if run:
                    times.append(time.perf_counter() - t0)
                chosen[label] = list(cal.fallen_back)
                if run == args.runs and protocol is not None:
                    metric[label] = protocol.evaluate(cal.model)
                cal.restore()
            seconds[label] = statistics.median(times)
        base = seconds["amp_num=0"]
        for label in settings:
            m = ", ".join(f"{k} {v:.4f}" for k, v in metric.get(label, {}).items())
            print(f"{name:<18} {label:<10} {seconds[label]:>7.2f} s {seconds[label] / base:>6.2f}×  {m}", flush=True)
        if len(settings) < 3:
            continue
        shared = set(chosen["isolated"]) & set(chosen["fisher"])
        print(f"{name:<18} both rankings fall back {len(shared)} of 5: {sorted(shared)}", flush=True)


if __name__ == "__main__":
    main()
