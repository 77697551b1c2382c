"""GPTQ against round to nearest and AdaRound, each with bias correction (the default).

EfficientNet-Lite0 calibrated on 64 crops of five photos and evaluated on crops of the
three others (`protocols.efficientnet_lite0_unseen`); MiniLM on its protocol, W4A8 and W4
weight-only. First and last layer float (msModelSlim's default), activations by the
default observer, per-channel weights (`--fields '{"w_group_size": 128}'`: weight
groups). Times are the whole `Calibrator(...)` + `run()`
(cold compilation cache, as `timed_calibration`) and the step's own seconds.

    python benchmarks/gptq.py
    python benchmarks/gptq.py --models minilm --algos rtn gptq
    python benchmarks/gptq.py --models minilm --algos qdrop gptq+qdrop   # GPTQ as QDrop's start
    python benchmarks/gptq.py --models minilm --algos gptq --fields '{"w_sym": false}'
    python benchmarks/gptq.py --models minilm --algos rtn gptq --subsets 1 2 3   # mean ± std over draws
    python benchmarks/gptq.py --models minilm --algos rtn gptq --fields '{"w_group_size": 32}'
    python benchmarks/gptq.py --models minilm --algos gptq --cases W4A8 --subsets 0 1 2 3 \
        --fields '{"w_group_size": 16, "w_sym": false, "smooth_quant": true}'   # the 4-bit recipe

`--subsets`: calibration draws (`protocols.calibration_subset`; 0, the default, is the
protocol's own data); with more than one, each cell is the mean ± std over them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import jaxq
from bridge.evaluation import protocols
from common import mean_std, parse_args, timed_calibration

ALGOS = {
    "rtn": {},
    "gptq": {"gptq": True},
    "gptq-no-act-order": {"gptq": {"act_order": False}},
    "adaround": {"adaround": [True, 1000]},
    "gptq+adaround": {"gptq": True, "adaround": [True, 1000]},
    "qdrop": {"qdrop": [True, 300]},
    "gptq+qdrop": {"gptq": True, "qdrop": [True, 300]},
    "pd_quant": {"pd_quant": [True, 200]},
    "gptq+pd_quant": {"gptq": True, "pd_quant": [True, 200]},
    "adaround+pd_quant": {"adaround": [True, 1000], "pd_quant": [True, 200]},
}
CASES = {
    "efficientnet_lite0_unseen": [("W4A8", dict(w_bit=4, a_bit=8))],
    "minilm": [("W4A8", dict(w_bit=4, a_bit=8)), ("W4 weight-only", dict(w_bit=4, act_quant=False))],
}
KEY = {"efficientnet_lite0_unseen": ("agreement", "kl"), "minilm": ("mean_cos", "min_cos")}


def main(argv=None):
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--algos", nargs="*", default=["rtn", "gptq", "adaround"])
    extra.add_argument("--fields", type=json.loads, default={}, help="more QuantConfig fields, as JSON")
    extra.add_argument("--subsets", type=int, nargs="*", default=[0], help="calibration draws (0: the protocol's own)")
    extra.add_argument("--cases", nargs="*", default=None, help="cases to run (default: all; e.g. W4A8)")
    known, rest = extra.parse_known_args(argv)
    args = parse_args(__doc__, list(CASES), rest)
    width = 11 if len(known.subsets) == 1 else 18
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        draws = [dataclasses.replace(p, calib_data=protocols.calibration_subset(p, k)) for k in known.subsets]
        keys = KEY[name]
        print(f"\n{name} (calibration subsets {known.subsets})")
        print(f"{'case':<16}{'algorithm':<20}" + "".join(f"{k:>{width}}" for k in keys) + f"{'run s':>8}{'step s':>8}")
        for case, fields in CASES[name]:
            if known.cases is not None and case not in known.cases:
                continue
            for algo in known.algos:
                cfg = jaxq.QuantConfig(quant_mode=1, keep_acc=ALGOS[algo], **{**fields, **known.fields})
                metric, seconds, step = {k: [] for k in keys}, [], []
                for draw in draws:
                    cal, s, _ = timed_calibration(draw, cfg)
                    m = p.evaluate(cal.model)
                    for k in keys:
                        metric[k].append(m[k])
                    seconds.append(s)
                    step.append(
                        sum(r.seconds for r in cal.steps if r.step in ("gptq", "adaround", "blocks", "pd_quant"))
                    )
                cells = "".join(
                    f"{metric[k][0]:>11.4f}" if len(draws) == 1 else f"{mean_std(metric[k], 4):>18}" for k in keys
                )
                print(
                    f"{case:<16}{algo:<20}{cells}{statistics.mean(seconds):>8.1f}{statistics.mean(step):>8.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
