"""What calibration and `export_param` cost with the defaults: the warm `run()` (constructor
included), `export_param`'s time and bytes (quantized codes plus the carried float tensors,
`float_params.safetensors`) and `get_quant_params` (records re-derived for weights trained
since `run()`: a stamp check per layer when nothing changed).

    python benchmarks/export_cost.py                          # efficientnet_lite0 minilm, 6 runs
    PYTHONPATH=<checkout of another commit> python benchmarks/export_cost.py   # the same on that code

Config: label-free W8A8, histogram observer, defaults otherwise. The first run fills the
compilation cache; warm figures are medians of the other runs.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import torch

from bridge import Calibrator
from bridge.evaluation import protocols
from jaxq import QuantConfig


def measure(name: str, runs: int) -> dict:
    p = getattr(protocols, name)()
    cfg = QuantConfig(quant_mode=1, act_method=2)
    run_s, export_s, params_ms, size = [], [], [], 0
    for _ in range(runs):
        t = time.perf_counter()
        cal = Calibrator(p.make_model(), cfg, p.calib_data, progress=False).run()
        run_s.append(time.perf_counter() - t)
        out = pathlib.Path(tempfile.mkdtemp())
        t = time.perf_counter()
        cal.export_param(out / "p")
        export_s.append(time.perf_counter() - t)
        size = sum(f.stat().st_size for f in (out / "p").iterdir())
        t = time.perf_counter()
        cal.get_quant_params()
        params_ms.append((time.perf_counter() - t) * 1e3)
    return {
        "model": name,
        "run_s": statistics.median(run_s[1:]),
        "export_s": statistics.median(export_s),
        "export_mb": size / 1e6,
        "get_quant_params_ms": statistics.median(params_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["efficientnet_lite0", "minilm"])
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"{'model':<20} {'warm run s':>10} {'export s':>9} {'export MB':>10} {'get_quant_params ms':>20}")
    for name in args.models:
        r = measure(name, args.runs)
        print(
            f"{r['model']:<20} {r['run_s']:>10.2f} {r['export_s']:>9.3f} {r['export_mb']:>10.2f} "
            f"{r['get_quant_params_ms']:>20.1f}"
        )


if __name__ == "__main__":
    main()
