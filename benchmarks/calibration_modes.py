"""Calibration in every mode: metric, time against the FP32 forward floor and torch.ao.

Rows per model: act_method 0 (sigma), 1 (min-max), 2 (histogram) — metric, cold and
warm calibration time (activation capture + finalize + weights, the `run()` call), XLA
compilations per run — and torch.ao's MinMaxObserver / HistogramObserver hooked on the
same layers over the same data. Then data-free EfficientNet-Lite0: uniform vs.
BN-statistics virtual data (`--no-data-free` skips it: the distillation takes minutes).

Every warm time is paired with a float forward measured just before it, and the table
gives medians over REPEATS pairs (floor, time, and the ratio of each pair): this VM's
speed drifts by up to 2× within minutes, so a floor taken once at the start made ratios
swing between runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols
from bridge.capture.data import iter_batches, run_model
from bridge.inplace.fakequant import model_quantizers
from common import parse_args, timed_calibration

REPEATS = 5


def paired(p, seconds) -> tuple[float, float, float]:
    """Medians of `(floor, seconds(), seconds() / floor)` over REPEATS pairs."""
    floors, times = [], []
    for _ in range(REPEATS):
        floors.append(p.fp_forward_seconds())
        times.append(seconds())
    ratios = [t / f for t, f in zip(times, floors)]
    return statistics.median(floors), statistics.median(times), statistics.median(ratios)


def torchao_seconds(p, observer_cls) -> float:
    """torch.ao observers on every layer input: capture plus qparams computation."""
    cal = Calibrator(
        p.make_model(),
        jaxq.QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True),
        p.calib_data,
        progress=False,
    )
    layers = model_quantizers(cal.model)
    observers = {n: observer_cls() for n in layers}
    hooks = [w.module.register_forward_pre_hook(lambda m, a, n=n: observers[n](a[0])) for n, w in layers.items()]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, b in iter_batches(p.calib_data, torch.device("cpu")):
            run_model(cal.model, b, i)
    for o in observers.values():
        o.calculate_qparams()
    seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    return seconds


def main(argv=None):
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    args = parse_args(__doc__, ["efficientnet_lite0", "minilm"], argv, extra=_extra_args)
    head = f"{'model':<19} {'method':<22} {'metric':<36} {'fp fwd s':>8} {'cold s':>7} {'warm s':>7} {'warm/fp':>7} {'compiles':>9}"  # noqa: E501 (a table row)
    print(head)
    print("-" * len(head))
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        p.fp_forward_seconds()  # warm-up
        for am, label in ((0, "jaxq sigma=25"), (1, "jaxq min-max"), (2, "jaxq histogram")):
            cfg = jaxq.QuantConfig(quant_mode=1, act_method=am, quantize_first_last=True)
            cal, cold, cold_c = timed_calibration(p, cfg, include_setup=False)
            warm_c = []

            def warm_seconds():
                _, seconds, compiles = timed_calibration(p, cfg, include_setup=False)
                warm_c.append(compiles)
                return seconds

            floor, warm, ratio = paired(p, warm_seconds)
            metric = ", ".join(f"{k}={v:.4f}" for k, v in p.evaluate(cal.model).items())
            print(
                f"{name:<19} {label:<22} {metric:<36} {floor:>8.2f} {cold:>7.2f} {warm:>7.2f} {ratio:>7.2f} {cold_c:>4}/{max(warm_c):<4}",  # noqa: E501 (a table row)
                flush=True,
            )
        for cls, label in ((MinMaxObserver, "torch.ao MinMax"), (HistogramObserver, "torch.ao Histogram")):
            floor, s, ratio = paired(p, lambda: torchao_seconds(p, cls))
            print(
                f"{name:<19} {label:<22} {'(capture + qparams only)':<36} {floor:>8.2f} {'':>7} {s:>7.2f} {ratio:>7.2f}",  # noqa: E501 (a table row)
                flush=True,
            )
    if "efficientnet_lite0" in args.models and args.data_free:
        p = protocols.efficientnet_lite0()
        print("\ndata-free EfficientNet-Lite0 (input_shape [8, 3, 224, 224], no real data)")
        for kind in ("uniform", "bn_stats"):
            for am in (0, 2):
                cfg = jaxq.QuantConfig(
                    input_shape=[8, 3, 224, 224], act_method=am, quantize_first_last=True, virtual_data=kind
                )
                t0 = time.perf_counter()
                cal = Calibrator(p.make_model(), cfg, progress=False).run()
                m = p.evaluate(cal.model)
                print(
                    f"  {kind:<9} act_method={am}  agreement={m['agreement']:.4f} kl={m['kl']:.4f}  ({time.perf_counter() - t0:.1f} s)",  # noqa: E501 (a table row)
                    flush=True,
                )


def _extra_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--no-data-free", dest="data_free", action="store_false", help="skip the data-free EfficientNet-Lite0 rows"
    )


if __name__ == "__main__":
    main()
