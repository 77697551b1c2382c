"""Peak resident memory and time of accuracy keeping on EfficientNet-Lite0, whole process.

    python benchmarks/keep_acc_memory.py
    python benchmarks/keep_acc_memory.py --algos easy_quant --budget 768

Each algorithm runs in a fresh process (W8A8 histogram, the model and its 32 calibration
crops only, compilation cache off): the peak of the process's resident memory sampled
every 20 ms, per pipeline phase, and the run's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[4])
import torch
torch.set_num_threads(int(sys.argv[3]))
from common import PeakMemory
from bridge import Calibrator, jit_cache
from bridge.evaluation import protocols
from jaxq import QuantConfig

jit_cache.disable()
algo, budget = sys.argv[1], int(sys.argv[2]) or None
p = protocols.PROTOCOLS["efficientnet_lite0"]()
model, data = p.make_model(), p.calib_data
memory = PeakMemory()
steps = [True, 1000] if algo == "adaround" else [True, 100]
cfg = QuantConfig(quant_mode=1, act_method=2, memory_budget=budget, keep_acc={algo: steps})
t = time.perf_counter()
cal = Calibrator(model, cfg, data, progress=False).run()
seconds = time.perf_counter() - t
print(json.dumps({"peak_mib": memory.stop(), "seconds": seconds, "timings": cal.timings}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--algos", nargs="*", default=["easy_quant", "adaround"])
    ap.add_argument("--budget", type=int, default=0, help="QuantConfig.memory_budget MiB (0: the default)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"{'algorithm':<12}{'peak MiB':>10}{'run s':>8}  {'sample rows s':>14}{'algorithm s':>12}")
    for algo in args.algos:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, algo, str(args.budget), str(args.threads), os.path.dirname(__file__)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        t = r["timings"]
        print(
            f"{algo:<12}{r['peak_mib']:>10.0f}{r['seconds']:>8.0f}  {t.get('sample_rows_s', 0):>14.1f}"
            f"{t.get(algo + '_s', 0):>12.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
