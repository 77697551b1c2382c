"""Shared pieces of the benchmark scripts: arguments, timed calibration, peak memory."""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

import jaxq
from bridge import Calibrator


def parse_args(description: str, models: list[str], argv=None, extra=None) -> argparse.Namespace:
    """`--models`, `--threads` (applied to torch here), `--bias-correction`, and whatever
    `extra(parser)` adds."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", nargs="*", default=models)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--jit-cache",
        action="store_true",
        help="keep JAX's persistent compilation cache on (off by default here: cold runs stay cold)",
    )
    ap.add_argument(
        "--bias-correction",
        action="store_true",
        help="calibrate with QuantConfig(bias_correction=True) (scripts that sweep configs)",
    )
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.jit_cache:
        from bridge import jit_cache

        jit_cache.disable()
    return args


def mean_std(values, digits: int = 3) -> str:
    """`mean ± std` of `values` (std 0 for a single value), to `digits` decimals."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def photo_evaluation_sets(threads: int) -> dict:
    """Set torch's threads, switch the compilation cache off, and return EfficientNet-Lite0's
    two evaluation sets of the unseen-photo protocol (docs/evaluation.md §1), each
    `(crops, float logits)`: "unseen" (128 crops of the three unseen photos, seed 2) and
    "calib photos" (128 new crops of the five calibration photos, seed 1003, no subset's seed)."""
    from bridge import jit_cache
    from bridge.evaluation import metrics, zoo

    torch.set_num_threads(threads)
    jit_cache.disable()
    float_model = zoo.efficientnet_lite0()
    sets = {}
    for name, which, seed in (("unseen", zoo.UNSEEN_PHOTOS, 2), ("calib photos", zoo.CALIBRATION_PHOTOS, 1003)):
        images = zoo.image_crops(128, seed=seed, which=which)
        sets[name] = (images, metrics.logits(float_model, images))
    return sets


def timed_calibration(protocol, cfg, include_setup: bool = True) -> tuple[Calibrator, float, int]:
    """`(calibrator, seconds, compilations)` on the protocol's data: the time of
    `Calibrator(...)` + `run()`, or of `run()` alone (no fusion, no FP copy) if not `include_setup`."""
    if not include_setup:
        cal = Calibrator(protocol.make_model(), cfg, protocol.calib_data, progress=False)
    with jaxq.compile_count() as compiles:
        t0 = time.perf_counter()
        if include_setup:
            cal = Calibrator(protocol.make_model(), cfg, protocol.calib_data, progress=False)
        cal.run()
        seconds = time.perf_counter() - t0
    return cal, seconds, compiles.count


class PeakMemory:
    """The largest resident memory (MiB) of this process, sampled every `every` seconds on a
    thread from construction until `stop()`; `peak_mib` holds it."""

    def __init__(self, every: float = 0.02):
        self.peak_mib, self._every, self._done = 0.0, every, False
        self._page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done:
            with open("/proc/self/statm") as f:
                self.peak_mib = max(self.peak_mib, int(f.read().split()[1]) * self._page / 2**20)
            time.sleep(self._every)

    def stop(self) -> float:
        self._done = True
        return self.peak_mib
