"""What a user feels: one whole fresh process per job (imports, model load, calibration,
export), jaxq against the same job done by hand with torch.ao observers.

    python benchmarks/user_time.py                      # every model, 3 runs each
    python benchmarks/user_time.py --models efficientnet_lite0 minilm --runs 3

Job: W8A8, every Linear/Conv, histogram activation observer, per-channel symmetric int8
weights, parameters written to disk. jaxq: `Calibrator(...).run()` + `export_param`, once
with an empty compilation cache (a new directory per run) and once with the cache the
previous runs filled. torch.ao: `HistogramObserver` hooks on the same layers, then
`PerChannelMinMaxObserver` on each weight, `calculate_qparams`, `torch.save` — no jax
import. Each cell: median wall time of `--runs` processes and the peak resident memory
(`ru_maxrss` of that process). Run it from the checkout it measures: each job is a
`python -c` in the current directory, which comes first on `sys.path` (a `PYTHONPATH` to
another checkout does not win).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ZOO = HERE.parent / "bridge" / "evaluation" / "zoo.py"

LOAD = textwrap.dedent(f"""
    import sys, importlib.util, torch
    torch.set_num_threads(2)
    sys.path.insert(0, {str(HERE)!r})
    def _zoo():
        spec = importlib.util.spec_from_file_location("zoo", {str(ZOO)!r})  # no `bridge` import
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod
    def load(name):
        if name == "efficientnet_lite0":
            z = _zoo(); crops = z.image_crops(32, seed=1)
            return z.efficientnet_lite0(), [crops[i:i + 8] for i in range(0, 32, 8)]
        if name == "minilm":
            z = _zoo(); tok, model = z.minilm()
            return model, z.text_batches(tok, z.text_passages()[:64], batch_size=1)
        from architectures import MODELS
        return MODELS[name]()
""")

JAXQ_JOB = LOAD + textwrap.dedent("""
    import jaxq
    from bridge import Calibrator
    model, data = load(sys.argv[1])
    cfg = jaxq.QuantConfig(quant_mode=1, act_method=2, quantize_first_last=True)
    Calibrator(model, cfg, data, progress=False).run().export_param(sys.argv[2])
""")

TORCH_AO_JOB = LOAD + textwrap.dedent("""
    import warnings
    from torch import nn
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver
    warnings.simplefilter("ignore")
    model, data = load(sys.argv[1])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    observers = {n: HistogramObserver(dtype=torch.quint8) for n in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: observers[n](a[0].detach())) for n, m in layers.items()]
    with torch.no_grad():
        for b in data:
            model(**b) if isinstance(b, dict) else model(b)
    params = {}
    for n, m in layers.items():
        w = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        w(m.weight.detach())
        ws, wz = w.calculate_qparams()
        s, z = observers[n].calculate_qparams()
        q = torch.quantize_per_channel(m.weight.detach(), ws, wz, 0, torch.qint8).int_repr()
        params[n] = {"weight_scale": ws, "quant_weight": q, "input_scale": s, "input_offset": z}
    torch.save(params, sys.argv[2] + ".pt")
""")

MODEL_NAMES = ["efficientnet_lite0", "minilm", "pitch_cnn", "pnet", "rnet", "onet", "efficientnet_260", "vgg_unet"]


def run_process(script: str, args: list[str], env: dict) -> tuple[float, float]:
    """`(wall seconds, peak RSS MiB)` of one fresh `python -c script args`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def median_job(script, name, runs, env_for_run) -> tuple[float, float]:
    times, peaks = [], []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as out:
            t, rss = run_process(script, [name, out + "/params"], env_for_run(i))
        times.append(t)
        peaks.append(rss)
    return statistics.median(times), max(peaks)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODEL_NAMES)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JAXQ_"))}
    print(
        f"{'model':<18} {'torch.ao s':>10} {'MiB':>6} {'jaxq empty s':>12} {'MiB':>6} {'×':>5} "
        f"{'jaxq filled s':>13} {'MiB':>6} {'×':>5}"
    )
    for name in args.models:
        with tempfile.TemporaryDirectory() as cache_root:
            ao_t, ao_m = median_job(TORCH_AO_JOB, name, args.runs, lambda i: base)
            empty_t, empty_m = median_job(
                JAXQ_JOB, name, args.runs, lambda i: {**base, "JAXQ_COMPILATION_CACHE": f"{cache_root}/empty{i}"}
            )
            filled = {**base, "JAXQ_COMPILATION_CACHE": f"{cache_root}/empty0"}  # filled by the first empty run
            full_t, full_m = median_job(JAXQ_JOB, name, args.runs, lambda i: filled)
        print(
            f"{name:<18} {ao_t:>10.2f} {ao_m:>6.0f} {empty_t:>12.2f} {empty_m:>6.0f} {empty_t / ao_t:>5.2f} "
            f"{full_t:>13.2f} {full_m:>6.0f} {full_t / ao_t:>5.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
