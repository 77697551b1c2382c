"""What bias correction (on by default with real data) costs: warm `run()` with the
default against `bias_correction=False`, and the float forward over the same data.

    python benchmarks/bias_correction_cost.py
    python benchmarks/bias_correction_cost.py --models efficientnet_lite0 pnet --runs 5
    python benchmarks/bias_correction_cost.py --amp-num 5   # and the default with amp_num=5

W8A8 histogram, every layer quantized. EfficientNet-Lite0 and MiniLM on their protocols;
the random-weight architectures of `architectures.py` on their calibration batches. Each
cell is the median of `--runs` warm runs (constructor included) after one run that fills
the compilation cache; the float forward is timed the same way.
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


def _forward(make, batches) -> float:
    model = make()
    with torch.no_grad():
        t = time.perf_counter()
        for b in batches:
            model(**b) if isinstance(b, dict) else model(*b) if isinstance(b, (tuple, list)) else model(b)
    return time.perf_counter() - t


def _run(make, batches, cfg) -> float:
    t = time.perf_counter()
    cal = Calibrator(make(), cfg, batches, progress=False).run()
    seconds = time.perf_counter() - t
    cal.restore()
    return seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["efficientnet_lite0", "minilm", "pnet", "onet", "efficientnet_260"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp-num", type=int, default=0, help="also time the default with this amp_num")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    amp = f"{f'amp_num={args.amp_num} s':>14}{'amp/default':>12}" if args.amp_num else ""
    print(f"{'model':<20}{'fp fwd s':>9}{'no BC s':>9}{'default s':>10}{'default/no BC':>14}{'default/fp':>11}{amp}")
    for name, make, batches in _cases(args.models):
        off = QuantConfig(quant_mode=1, act_method=2, quantize_first_last=True, bias_correction=False)
        on = off.replace(bias_correction=None)
        for cfg in (off, on):
            _run(make, batches, cfg)  # fills the compilation cache
        fp = statistics.median(_forward(make, batches) for _ in range(args.runs))
        t_off = statistics.median(_run(make, batches, off) for _ in range(args.runs))
        t_on = statistics.median(_run(make, batches, on) for _ in range(args.runs))
        amp = ""
        if args.amp_num:
            with_amp = on.replace(amp_num=args.amp_num)
            _run(make, batches, with_amp)
            t_amp = statistics.median(_run(make, batches, with_amp) for _ in range(args.runs))
            amp = f"{t_amp:>14.2f}{t_amp / t_on:>12.2f}"
        print(f"{name:<20}{fp:>9.2f}{t_off:>9.2f}{t_on:>10.2f}{t_on / t_off:>14.2f}{t_on / fp:>11.2f}{amp}", flush=True)


if __name__ == "__main__":
    main()
