"""The model as a JAX function: float forward and isolated sensitivity, torch vs JAX.

Per model (W8A8 default config, the first 10 calibration samples as `amp` uses them):
the float forward of those samples in torch and in the lowered JAX function (warm), and
every quantized layer's isolated sensitivity by the torch loop (`bridge.studies.sensitivity`)
and by the vectorised program (`bridge.jax_model.isolated_sensitivity`, cold = first
call with compilation, warm = second), with the rank agreement of the two, for 1, 4, 8
and 16 (the default) groups of layers in the one program.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import torch

import jaxq
from bridge import Calibrator
from bridge.studies import sensitivity as sens
from bridge.capture.data import run_model
from bridge.evaluation import protocols
from bridge.jax_model import isolated_sensitivity
from bridge.jax_model.collate import merge_batches
from bridge.jax_model.lower import lower, to_jax_tree
from common import parse_args


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def float_forward(cal, batches):
    model = cal.fp_model
    with torch.no_grad():
        [run_model(model, b, i) for i, b in enumerate(batches)]
        _, t_torch = _timed(lambda: [run_model(model, b, i) for i, b in enumerate(batches)])
    lowered = lower(model)
    f = jax.jit(lowered.fn)
    merged = [(to_jax_tree(m.batch.args), to_jax_tree(m.batch.kwargs)) for m in merge_batches(batches)]
    run = lambda: [jax.block_until_ready(f(lowered.params, lowered.buffers, a, k)) for a, k in merged]  # noqa: E731
    run()
    _, t_jax = _timed(run)
    return t_torch, t_jax


def main(argv=None):
    args = parse_args(__doc__, ["efficientnet_lite0", "minilm"], argv)
    rows = []
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        calib = p.calib_data if name != "minilm" else p.calib_data[:16]
        cal = Calibrator(p.make_model(), jaxq.QuantConfig(w_bit=8, a_bit=8), calib, progress=False).run()
        batches = cal.calibration_batches(10)
        fwd_torch, fwd_jax = float_forward(cal, batches)
        loop, t_loop = _timed(lambda: sens.isolated_sensitivity(cal.model, cal.quantizers, batches))
        qf, t_lower = _timed(lambda: cal.jax_forward(batches[0]))
        for groups in (1, 4, 8, 16):
            _, cold = _timed(lambda: isolated_sensitivity(qf, batches, groups))
            vec, warm = _timed(lambda: isolated_sensitivity(qf, batches, groups))
            names = list(loop)
            a, b = np.array([loop[n] for n in names]), np.array([vec[n] for n in names])
            rows.append(
                (
                    name,
                    len(names),
                    fwd_torch,
                    fwd_jax,
                    t_loop,
                    t_lower,
                    f"{groups} (default)" if groups == 16 else str(groups),
                    cold,
                    warm,
                    _spearman(a, b),
                    list(np.argsort(-a)[:10]) == list(np.argsort(-b)[:10]),
                )
            )
    print(
        "| model | layers | fp forward torch / JAX (s) | isolated: torch loop (s) | lower (s) | layer groups | JAX cold (s) | JAX warm (s) | warm speed-up | Spearman | same top 10 |"  # noqa: E501 (a table row)
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]:.2f} / {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]} | {r[7]:.1f} | {r[8]:.2f} | "  # noqa: E501 (a table row)
            f"{r[4] / r[8]:.2f}× | {r[9]:.4f} | {r[10]} |"
        )


if __name__ == "__main__":
    main()
