"""Data-parallel calibration over 1, 2 and 4 simulated CPU devices (`Calibrator(mesh=…)`).

Per model and device count, a fresh process with `--xla_force_host_platform_device_count`
calibrates W8A8 (histogram, `act_method=2`, and min-max, `act_method=1`) through the
lowered model with the batch axis split over the mesh (`bridge.jax_model.observe`), and
reports `run()`'s time (cold: compilations included) and whether every input scale,
offset and weight code equals the one-device run's. The torch path (no mesh) is the
reference time. MiniLM's 64 one-passage batches are regrouped 4 at a time and padded to
128 tokens (both paths see the same batches). Simulated devices share this machine's cores: the times show the
overhead of partitioning, not a speed-up.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import parse_args

HERE = Path(__file__).resolve().parent


def worker(model: str, devices: int, method: int, out: str) -> None:
    import os
    import time

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(devices, 1)}"
    import jax

    import jaxq
    from bridge import Calibrator, jit_cache
    from bridge.evaluation import protocols
    from jaxq.sharding import data_mesh

    jit_cache.disable()
    p = protocols.PROTOCOLS[model]()
    calib = p.calib_data if model != "minilm" else padded_groups(p.calib_data, 4, 128)
    mesh = None if devices == 0 else data_mesh(jax.devices()[:devices])
    cal = Calibrator(
        p.make_model(), jaxq.QuantConfig(w_bit=8, a_bit=8, act_method=method), calib, progress=False, mesh=mesh
    )
    t = time.perf_counter()
    cal.run()
    seconds = time.perf_counter() - t
    arrays = {}
    for name, r in cal.records.items():
        arrays[f"{name}/codes"] = r.codes
        if r.input_scale is not None:
            arrays[f"{name}/input_scale"], arrays[f"{name}/input_offset"] = r.input_scale, r.input_offset
    np.savez(out, seconds=seconds, batches=len(calib), **arrays)


def padded_groups(batches, size: int, length: int) -> list[dict]:
    """One-passage token batches regrouped `size` at a time, padded to `length` (mask 0)."""
    import torch

    groups = []
    for i in range(0, len(batches) - size + 1, size):
        group = {}
        for key in batches[i]:
            rows = [b[key][0, :length] for b in batches[i : i + size]]
            group[key] = torch.stack([torch.nn.functional.pad(r, (0, length - r.shape[0])) for r in rows])
        groups.append(group)
    return groups


def run(model: str, devices: int, method: int, tmp: Path) -> dict:
    out = tmp / f"{model}-{devices}-{method}.npz"
    subprocess.run(
        [sys.executable, __file__, "--worker", model, str(devices), str(method), str(out)],
        check=True,
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    d = np.load(out)
    return {k: d[k] for k in d.files}


def compare(a: dict, b: dict) -> tuple[bool, float]:
    keys = [k for k in a if "/" in k]
    exact = all(np.array_equal(a[k], b[k]) for k in keys)
    scales = [k for k in keys if k.endswith("input_scale")]
    rel = max((float(np.max(np.abs(a[k] / b[k] - 1))) for k in scales), default=0.0)
    return exact, rel


def main(argv=None):
    args = parse_args(__doc__, ["efficientnet_lite0", "minilm"], argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for method in (2, 1):
                torch_run = run(model, 0, method, Path(tmp))
                one = run(model, 1, method, Path(tmp))
                exact, rel = compare(torch_run, one)
                rows.append((model, method, "torch (no mesh)", torch_run, "—", f"{rel:.1e}"))
                for devices in (1, 2, 4):
                    res = one if devices == 1 else run(model, devices, method, Path(tmp))
                    same, drift = compare(one, res)
                    rows.append((model, method, devices, res, str(same), f"{drift:.1e}"))
    print(
        "| model | act_method | devices | batches | run() s (cold) | equal to 1 device | max rel Δ input scale vs 1 device (torch row: vs torch) |"  # noqa: E501 (a table row)
    )
    print("|---|---|---|---|---|---|---|")
    for model, method, devices, res, same, rel in rows:
        print(
            f"| {model} | {method} | {devices} | {int(res['batches'])} | {float(res['seconds']):.1f} | {same} | {rel} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
