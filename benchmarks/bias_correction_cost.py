"""What bias correction (on by default with real data) costs: warm `run()` with the
default against `bias_correction=False`, and the float forward over the same data.

    python benchmarks/bias_correction_cost.py
    python benchmarks/bias_correction_cost.py --models efficientnet_lite0 pnet --runs 5
    python benchmarks/bias_correction_cost.py --amp-num 5   # and the default with amp_num=5
    python benchmarks/bias_correction_cost.py --defaults    # QuantConfig() as users get it

W8A8 histogram, every layer quantized (`--defaults`: `QuantConfig()`, the sigma statistic
with the first and last layers float). EfficientNet-Lite0 and MiniLM on their protocols;
the random-weight architectures of `architectures.py` on their calibration batches. Each
cell is the median of `--runs` warm runs (`Calibrator(model, ...)` and `run()`, on a model
built before the clock starts and restored after) after one run that fills the compilation
cache; the float forward is timed the same way, interleaved with the runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import architectures
from bridge import Calibrator
from bridge.evaluation import protocols
from jaxq import QuantConfig


def _cases(names):
    for name in names:
        if name in protocols.PROTOCOLS:
            p = protocols.PROTOCOLS[name]()
            yield name, p.make_model, p.calib_data
        else:
            model, batches = architectures.MODELS[name]()
            state = {k: v.clone() for k, v in model.state_dict().items()}

            def make(model=model, state=state):
                model.load_state_dict(state)
                return model

            yield name, make, batches


def _forward(model, batches) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        for b in batches:
            model(**b) if isinstance(b, dict) else model(*b) if isinstance(b, (tuple, list)) else model(b)
    return time.perf_counter() - t


def _run(model, batches, cfg) -> float:
    t = time.perf_counter()
    cal = Calibrator(model, cfg, batches, progress=False).run()
    seconds = time.perf_counter() - t
    cal.restore()
    return seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["efficientnet_lite0", "minilm", "pnet", "onet", "efficientnet_260"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp-num", type=int, default=0, help="also time the default with this amp_num")
    ap.add_argument("--defaults", action="store_true", help="QuantConfig() as users get it (sigma, ends float)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    amp = f"{f'amp_num={args.amp_num} s':>14}{'amp/default':>12}" if args.amp_num else ""
    print(f"{'model':<20}{'fp fwd s':>9}{'no BC s':>9}{'default s':>10}{'default/no BC':>14}{'default/fp':>11}{amp}")
    for name, make, batches in _cases(args.models):
        model = make()
        if args.defaults:
            on = QuantConfig()
            off = on.replace(bias_correction=False)
        else:
            off = QuantConfig(quant_mode=1, act_method=2, quantize_first_last=True, bias_correction=False)
            on = off.replace(bias_correction=None)
        with_amp = on.replace(amp_num=args.amp_num) if args.amp_num else None
        for cfg in (off, on, with_amp):
            if cfg is not None:
                _run(model, batches, cfg)  # fills the compilation cache
        times = {"fp": [], "off": [], "on": [], "amp": []}
        for _ in range(args.runs):  # interleaved: the machine's speed drifts within minutes
            times["fp"].append(_forward(model, batches))
            times["off"].append(_run(model, batches, off))
            times["on"].append(_run(model, batches, on))
            if with_amp is not None:
                times["amp"].append(_run(model, batches, with_amp))
        fp, t_off, t_on = (statistics.median(times[k]) for k in ("fp", "off", "on"))
        amp = ""
        if with_amp is not None:
            t_amp = statistics.median(times["amp"])
            amp = f"{t_amp:>14.2f}{t_amp / t_on:>12.2f}"
        print(f"{name:<20}{fp:>9.2f}{t_off:>9.2f}{t_on:>10.2f}{t_on / t_off:>14.2f}{t_on / fp:>11.2f}{amp}", flush=True)


if __name__ == "__main__":
    main()
