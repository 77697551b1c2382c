"""Calibration robustness: how much the quantized model depends on the calibration set.

The model is calibrated on `k` random subsets of the calibration batches (the torch
path: each subset's statistics need its own pass), then all `k` quantizer states are
scored on the evaluation batches in one `vmap`ped program of the JAX model: the
distance from float (KL for logits, `1 − cos` otherwise) as mean ± std and worst.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bridge.capture.data import as_batch
from bridge.jax_model.collate import merge_batches
from bridge.jax_model.lower import to_jax_tree
from bridge.jax_model.quantized import layer_state, quantized_forward
from bridge.jax_model.studies import primary
from jaxq.model_metrics import sample_distances
from jaxq.model_quant import Switches


@dataclasses.dataclass
class Robustness:
    """Distance from float per calibration subset, and its summary."""

    distances: np.ndarray
    subsets: list[list[int]]

    @property
    def mean(self) -> float:
        return float(np.mean(self.distances))

    @property
    def std(self) -> float:
        return float(np.std(self.distances))

    @property
    def worst(self) -> float:
        return float(np.max(self.distances))

    def __str__(self) -> str:
        return (
            f"{self.mean:.5g} ± {self.std:.2g} (worst {self.worst:.5g}) over {len(self.distances)} calibration subsets"
        )


def calibration_robustness(
    calibrate: Callable, calib_batches: list, eval_batches: list, k: int = 5, fraction: float = 0.5, seed: int = 0
) -> Robustness:
    """`calibrate(batches) -> bridge.calibrated.Calibrated` on `k` random subsets (`fraction`
    of the batches each), every result scored on `eval_batches` in one program:

        calibrate = lambda b: Calibrator(make_model(), cfg, b, progress=False).run().calibrated()
    """
    if not callable(calibrate):
        raise TypeError(
            f"calibrate must be a function of the calibration batches returning a Calibrated "
            f"(Calibrator(...).run().calibrated()), got {type(calibrate).__name__}"
        )
    if not 1 <= k <= 64:
        raise ValueError(f"k={k!r}: expected 1 to 64 calibration subsets")
    n = len(calib_batches)
    size = max(1, int(round(fraction * n)))
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r}: expected a number in (0, 1]")
    rng = np.random.default_rng(seed)
    subsets = [sorted(rng.choice(n, size=size, replace=False).tolist()) for _ in range(k)]
    cals = [_checked(calibrate([calib_batches[i] for i in s])) for s in subsets]
    qf = quantized_forward(cals[0].model, cals[0].records, as_batch(eval_batches[0], 0), cals[0].quantizers)
    states = []
    for cal in cals:
        if any(r.custom_codes for r in cal.records.values()):
            raise ValueError(
                "calibration_robustness scores quantizer states on one set of weights; rounding "
                "algorithms (round_opt, adaround) choose other weights per subset — leave them out here"
            )
        layers = cal.quantizers
        if list(layers) != qf.names:
            raise RuntimeError(
                "calibrations on different subsets quantized different layers "
                f"({sorted(set(layers) ^ set(qf.names))[:3]}); set disable_names explicitly"
            )
        states.append({name: layer_state(cal.records.get(name), q) for name, q in layers.items()})
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    lw, sw = qf.lowered, qf.default_switches()
    n_layers = len(qf.layers)
    off = Switches(jnp.zeros(n_layers), jnp.zeros(n_layers))

    @jax.jit
    def score(stacked, args, kwargs, mask):
        fp = primary(qf.fn(lw.params, lw.buffers, qf.state, off, args, kwargs))
        one = lambda state: jnp.mean(
            sample_distances(fp, primary(qf.fn(lw.params, lw.buffers, state, sw, args, kwargs)), mask)
        )  # noqa: E731
        return jax.lax.map(one, stacked), fp.shape[0]

    total, count = np.zeros(k), 0
    for m in merge_batches([as_batch(b, i) for i, b in enumerate(eval_batches)]):
        mask = None if m.token_mask is None else jnp.asarray(m.token_mask.numpy())
        d, rows = score(stacked, to_jax_tree(m.batch.args), to_jax_tree(m.batch.kwargs), mask)
        total += int(rows) * np.asarray(d)
        count += int(rows)
    return Robustness(total / count, subsets)


def _checked(calibrated):
    from bridge.calibrated import Calibrated

    if not isinstance(calibrated, Calibrated):
        raise TypeError(
            f"calibrate(batches) returned {type(calibrated).__name__}; return a bridge.calibrated.Calibrated "
            "(Calibrator(...).run().calibrated())"
        )
    return calibrated
