"""Activation step sizes learned on the whole model's output (the math: `jaxq.pd_quant`).

1. the model's inputs and its float outputs are captured once over the calibration data
   (token batches padded to one length, as for block reconstruction);
2. the calibrated model is lowered to JAX with its quantizers (`quantized_forward`: codes,
   bias correction and SmoothQuant as calibrated), every input step size learnable;
3. `jaxq.pd_quant.optimise` learns them in one compiled program on the fitted samples;
4. the learned step sizes replace the calibrated ones only if the output distance on the
   held-out samples (`recon_holdout`; all samples without a split) is lower than before.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from torch import nn

from bridge.capture.data import iter_batches
from bridge.inplace.record import LayerRecord, apply_records
from bridge.jax_model.fitting import capture_block, compile_within, equal_shapes
from bridge.jax_model.quantized import quantized_forward
from bridge.jax_model.studies import primary
from jaxq import block_reconstruction as br
from jaxq import pd_quant as pd
from jaxq.keep_acc import PdQuant
from jaxq.model_metrics import sample_distances


@dataclasses.dataclass
class PdReport:
    """The output distance (`jaxq.model_metrics`) before and after on the fitted samples
    and on the held-out ones (NaN without a split); `kept`: the learned step sizes replaced
    the calibrated ones; `scales`: layer → learned / calibrated step size."""

    fitted_before: float
    fitted_after: float
    held_before: float
    held_after: float
    kept: bool
    samples: int
    held_samples: int
    seconds: float
    compilations: int
    scales: dict = dataclasses.field(default_factory=dict)
    micro_batch: int = 0  # samples per gradient pass
    working_mib: float = float("nan")  # the program's temporaries (XLA's memory analysis)

    @property
    def deciding(self) -> tuple[float, float]:
        """`(before, after)` on the samples that decide `kept`: the held-out ones, or all."""
        if self.held_samples:
            return self.held_before, self.held_after
        return self.fitted_before, self.fitted_after


def _apply(qf, static):
    """`apply(consts, u, (args, kwargs))`: the quantized model's output with every input step
    size `s⁰·eᵘ`; `consts = (params, buffers, state)` are arguments, not program constants."""
    n_args, tensor_positions, static_args, static_kwargs = static
    switches = qf.default_switches()

    def apply(consts, u, inputs):
        params, buffers, state = consts
        t_args, t_kwargs = inputs
        it = iter(t_args)
        args = tuple(next(it) if i in tensor_positions else static_args[i] for i in range(n_args))
        state = {n: s._replace(a_scale=s.a_scale * jnp.exp(u[n])) if n in u else s for n, s in state.items()}
        return primary(qf.fn(params, buffers, state, switches, args, {**static_kwargs, **t_kwargs}))

    return apply


def _distances(apply, consts, u, inputs, target, mask, chunk: int) -> jax.Array:
    """Per-sample output distance over all samples, `chunk` at a time (the last chunk
    repeats earlier samples to stay one shape; they are dropped)."""
    n = int(target.shape[0])
    idx = jnp.arange(-(-n // chunk) * chunk) % n
    per = jax.lax.map(
        lambda ix: sample_distances(
            target[ix], apply(consts, u, pd.take(inputs, ix)), None if mask is None else mask[ix]
        ),
        idx.reshape(-1, chunk),
    )
    return per.reshape(-1)[:n]


def _program(apply, params: PdQuant, micro: int):
    """The distances before, the learned `u`, the distances after, in one program."""

    def run(consts, u0, inputs, target, fitted, key, mask):
        before = _distances(apply, consts, u0, inputs, target, mask, micro)
        u = pd.optimise(functools.partial(apply, consts), u0, inputs, target, fitted, key, params, mask, micro)
        return u, before, _distances(apply, consts, u, inputs, target, mask, micro)

    return jax.jit(run)


def _program_within(apply, args, params: PdQuant, samples: int, budget: int | None):
    """`(compiled program, micro-batch, its temporaries in bytes)`: the mini-batch's gradient
    taken in halves until the program's temporaries fit `budget` (`fitting.compile_within`;
    the activations a whole-model backward pass keeps grow with the micro-batch), while the
    micro-batch divides the mini-batch."""
    compile_for = lambda micro: _program(apply, params, micro).lower(*args).compile()  # noqa: E731
    return compile_within(compile_for, min(params.batch, samples), budget, lambda m: m > 1 and m % 2 == 0)


def learn_input_scales(
    model: nn.Module,
    quantizers: dict,
    records: dict[str, LayerRecord],
    calib_data,
    device,
    params: PdQuant,
    set_quant,
    holdout: float = 0.0,
    seed: int = 0,
    copies: int = 0,
    synthetic: int = 0,
    budget: int | None = None,
) -> tuple[dict[str, LayerRecord], PdReport]:
    """The records with learned input step sizes (`records` unchanged if the held-out
    distance did not fall), and a report. `copies`, `synthetic`: `calib_data` is the
    calibration images, then that many augmented copies of them, then `synthetic` images
    (as for block reconstruction); a held-out image takes its copies with it. `budget`
    (bytes): the most the program's temporaries may take (`_program_within`)."""
    import jaxq

    t0 = time.perf_counter()
    batches, token_mask = equal_shapes(list(iter_batches(calib_data, device)))
    set_quant(False)
    captured = capture_block(model, "", batches)
    set_quant(True)
    inputs, static, target = captured.inputs, captured.static, captured.output
    qf = quantized_forward(model, records, captured.example, quantizers)
    del captured
    learnable = [layer.name for layer in qf.layers if layer.quantize_input and records.get(layer.name) is not None]
    learnable = [n for n in learnable if records[n].input_scale is not None]
    n = int(target.shape[0])
    mask = None
    if token_mask is not None and target.ndim == 3 and tuple(target.shape[:2]) == tuple(token_mask.shape):
        mask = jnp.asarray(token_mask.numpy())
    key = jax.random.PRNGKey(seed)
    held = _held_out(jax.random.fold_in(key, 1), n, holdout, copies, synthetic)
    fitted = jnp.asarray(np.nonzero(~held)[0].astype(np.int32))
    consts = (dict(qf.lowered.params), qf.lowered.buffers, qf.state)
    u0 = {name: jnp.float32(0.0) for name in learnable}
    args = (consts, u0, inputs, target, fitted, key, mask)
    with jaxq.compile_count() as compiles:
        run, micro, working = _program_within(_apply(qf, static), args, params, len(fitted), budget)
        u, before, after = jax.block_until_ready(run(*args))
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    fit_b, fit_a = float(before[~held].mean()), float(after[~held].mean())
    held_b, held_a = (float(before[held].mean()), float(after[held].mean())) if held.any() else (np.nan, np.nan)
    factors = {name: float(np.exp(np.float32(u[name]))) for name in learnable}
    report = PdReport(
        fit_b,
        fit_a,
        held_b,
        held_a,
        False,
        n,
        int(held.sum()),
        time.perf_counter() - t0,
        compiles.count,
        factors,
        micro,
        working / 2**20 if working is not None else float("nan"),
    )
    before, after = report.deciding
    report.kept = kept = bool(after < before)
    if not kept:
        return dict(records), report
    new = _learned_records(records, u, learnable)
    apply_records({n: quantizers[n] for n in learnable}, {n: new[n] for n in learnable})
    return new, report


def _held_out(key, n: int, share: float, copies: int, synthetic: int) -> np.ndarray:
    """Which of the `n` samples are held out: every copy of the images `holdout_split`
    holds out (none with `share` 0; synthetic samples never)."""
    held = np.zeros(n, bool)
    if share > 0:
        images = (n - synthetic) // (1 + copies)
        held_images = np.asarray(br.holdout_split(key, n, images, share, synthetic).held)
        i = np.arange(n)
        held = (i < n - synthetic) & np.isin(i % images, held_images)
    return held


def _learned_records(records: dict[str, LayerRecord], u: dict, learnable: list[str]) -> dict[str, LayerRecord]:
    """`records` with each learnable layer's input step size `s⁰·eᵘ`."""
    new = dict(records)
    for name in learnable:
        scale = np.asarray(records[name].input_scale, np.float32) * np.exp(np.float32(u[name]))
        new[name] = dataclasses.replace(records[name], input_scale=np.asarray(scale, np.float32))
    return new
