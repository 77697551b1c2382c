"""Runs the pipeline of `jaxq.pipeline.plan(cfg)` on a torch model, step by step.

Each step's runner captures what the step reads (observer states, rows, mean rows, block
inputs) and hands it to the pure JAX algorithm. Consecutive layer-local steps (EasyQuant,
SQuant, AdaRound, GPTQ) share one sampling of the rows, layer group by layer group within
the memory budget (`bridge.capture.memory`); mean rows for bias correction are taken in that same
pass when a later step needs them. Runs read the model and switch quantization only
inside their steps; the facade applies the records (`PipelineResult`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings

import jax.numpy as jnp
import numpy as np

import jaxq
from bridge.capture.observers import activation_qparams
from bridge.capture.context import Context
from bridge.inplace.fakequant import quantization, set_quantization
from bridge.capture.memory import (
    COPIES_FLOAT_INPUTS,
    COPIES_QUANTIZED_INPUTS,
    block_program_bytes,
    budget_bytes,
    plan_row_groups,
    release_compiled_programs,
    release_freed_memory,
)
from bridge.capture.row_capture import LayerGeometryError
from bridge.inplace.record import LayerRecord, apply_records, is_nearest, smoothing_of, weight_params
from bridge.capture.rows import (
    FunctionalLayerError,
    check_mean_rows_possible,
    finished_mean_rows,
    layer_rows,
    mean_rows_of,
    row_capture,
    row_floats,
)
from bridge.smoothing import smooth
from jaxq import groupwise
from bridge.capture.tensors import to_jax
from jaxq.accuracy import LAYER_STEPS, LayerState
from jaxq.pipeline import Step, layer_local, plan, rows_read


class BiasCorrectionSkipped(UserWarning):
    """Bias correction, on by default, could not run on this model and was left out."""


@dataclasses.dataclass
class StepReport:
    """What one step did: `layers` per layer `(error before, error after)` (or the step's
    own entries: SmoothQuant's groups, a `BlockReport` per block), its seconds, and why it
    was skipped (None when it ran)."""

    step: str
    seconds: float = 0.0
    layers: dict | list = dataclasses.field(default_factory=dict)
    skipped: str | None = None


@dataclasses.dataclass
class PipelineResult:
    """The records of every quantized layer, one `StepReport` per step, timings, and the
    layers the `fallback` step chose to return to float."""

    records: dict[str, LayerRecord]
    steps: list[StepReport]
    timings: dict[str, float]
    fall_back: list[str]

    @property
    def reports(self) -> dict:
        """`{step: its layers' entries}` of the steps that report (msModelSlim-style dict)."""
        return {r.step: r.layers for r in self.steps if r.layers and r.skipped is None}


@dataclasses.dataclass
class _State:
    float_weights: dict  # name → the float weight the `weights` step quantized
    weights: dict = dataclasses.field(default_factory=dict)  # name → jaxq.QuantizedWeight
    act: dict = dataclasses.field(default_factory=dict)  # name → jaxq.QParams
    mean_rows: dict | None = None
    corrections: dict | None = None
    records: dict | None = None  # set once a step needs the quantized torch model
    custom_codes: bool = False  # a rounding step chose codes other than the nearest
    fall_back: list = dataclasses.field(default_factory=list)


def run_pipeline(ctx: Context, all_layers: dict | None = None) -> PipelineResult:
    """Every step of `plan(ctx.cfg)` in order (the model left with quantization off)."""
    steps = plan(ctx.cfg)
    _check_lowerable(ctx, steps)
    state, reports, timings = _State({}), [], {}
    recon = _reconstruction_context(ctx, steps)
    i = 0
    while i < len(steps):
        chain = [steps[i]]
        if layer_local(steps[i]) and "rows" in steps[i].reads:
            while i + len(chain) < len(steps) and layer_local(steps[i + len(chain)]):
                chain.append(steps[i + len(chain)])
        t = time.perf_counter()
        if "rows" in chain[0].reads:
            # mean rows of augmented images are not the model's E[x]: bias correction then reads the images
            later_mean_rows = any("mean_rows" in s.reads for s in steps[i + len(chain) :]) and recon is ctx
            reports += _run_layer_chain(recon, state, chain, later_mean_rows, timings)
        else:
            step_ctx = recon if chain[0].name in ("blocks", "pd_quant") else ctx
            reports.append(RUNNERS[chain[0].name](step_ctx, state, chain[0], all_layers))
            reports[-1].seconds = time.perf_counter() - t
        for r in reports[-len(chain) :]:
            timings[f"{r.step}_s"] = r.seconds
        i += len(chain)
    if "activations_s" in timings and "smooth_quant_s" in timings:
        timings["activations_s"] += timings.pop("smooth_quant_s")
    return PipelineResult(_records(ctx, state), reports, timings, state.fall_back)


def _reconstruction_context(ctx: Context, steps) -> Context:
    """`ctx` with the calibration images, `cfg.recon_augment` augmented copies of each and
    then the `recon_synthetic` images, for the steps that fit layers or blocks (`ctx` itself
    when there are none or nothing is added)."""
    if not (ctx.cfg.recon_augment or ctx.synthetic) or not _fits(steps):
        return ctx
    from bridge.capture.augment import augmented_batches

    batches = augmented_batches(ctx.calib_data, ctx.cfg.recon_augment, ctx.cfg.seed)
    return dataclasses.replace(ctx, calib_data=batches + list(ctx.synthetic))


def _fits(steps) -> bool:
    """Whether a step fits layers or blocks to data (and budgets its memory)."""
    return any("rows" in s.reads or "block_io" in s.reads or s.name == "pd_quant" for s in steps)


# -- steps ------------------------------------------------------------------------------
def _smooth_quant(ctx: Context, state: _State, step: Step, all_layers) -> StepReport:
    return StepReport(step.name, layers=smooth(ctx))


def _activations(ctx: Context, state: _State, step: Step, all_layers) -> StepReport:
    """The observers' input quantizers; when the step also reads mean rows (bias correction
    with no row step before it), they are summed in the same torch forwards."""
    if "mean_rows" in step.reads and ctx.mesh is None:
        try:
            check_mean_rows_possible(ctx)
            rows = row_capture(ctx, ctx.cfg.recon_rows, check=True, keep_rows=False)
            state.act = activation_qparams(ctx, beside=rows)
            state.mean_rows = finished_mean_rows(rows)
        except (FunctionalLayerError, LayerGeometryError):
            if not ctx.default_bias_correction:
                raise
            state.act = activation_qparams(ctx)  # the bias-correction step says why it is left out
    else:
        state.act = activation_qparams(ctx)
    if _fits(plan(ctx.cfg)):
        release_freed_memory()  # the observed forwards' activations, before the steps that budget memory
    return StepReport(step.name)


def _weights(ctx: Context, state: _State, step: Step, all_layers) -> StepReport:
    """Round to nearest under per-channel scales of `cfg.w_range`, or ADMM's scales from there (`step.settings`),
    of the float weights as the earlier steps left them (SmoothQuant scales them)."""
    state.float_weights = {n: to_jax(q.float_weight.float()) for n, q in ctx.quantizers.items()}
    _check_weights(state.float_weights)
    weights = {}
    with ctx.bar("jaxq admm", len(state.float_weights), disable=step.settings is None) as bar:
        for scheme, names in _by_scheme(ctx).items():  # one group unless cfg.layer_bits sets other widths
            group = {n: state.float_weights[n] for n in names}
            weight_range = ctx.cfg.weight_range_for(scheme.bits)
            if step.settings is not None:
                weights.update(jaxq.accuracy.admm_weights(group, scheme, step.settings.iters, bar.update, weight_range))
            else:
                weights.update(_nearest(ctx, group, scheme, weight_range))
    state.weights = {n: weights[n] for n in state.float_weights}
    return StepReport(step.name)


def _nearest(ctx: Context, weights: dict, scheme, weight_range: str) -> dict:
    """Round to nearest per channel, or per group of columns (`QuantConfig.w_group_size`):
    a grouped weight is quantized as its `group_rows` and comes back in the weight's shape."""
    groups = {n: ctx.quantizers[n].weight_group for n in weights}
    rows = {n: w if groups[n] is None else groupwise.group_rows(w, groups[n]) for n, w in weights.items()}
    done = jaxq.quantize_weights(rows, scheme, weight_range)
    return {
        n: done[n] if groups[n] is None else groupwise.from_group_rows(done[n], np.shape(w)) for n, w in weights.items()
    }


def _round_opt(ctx: Context, state: _State, step: Step, all_layers) -> StepReport:
    with ctx.bar("jaxq round_opt", len(state.weights)) as bar:
        out, _ = LAYER_STEPS["round_opt"](
            state.float_weights, LayerState(state.weights, state.act, {}), step.settings, bar.update
        )
    state.weights, state.custom_codes = out.weights, True
    return StepReport(step.name)


def _run_layer_chain(
    ctx: Context, state: _State, chain: list[Step], mean_rows: bool, timings: dict
) -> list[StepReport]:
    """The layer-local `chain` on one sampling of rows per layer group (memory budget)."""
    cfg = ctx.cfg
    copies = COPIES_QUANTIZED_INPUTS if cfg.recon_inputs == "quantized" else COPIES_FLOAT_INPUTS
    groups, per_layer = plan_row_groups(row_floats(ctx), cfg.recon_rows, copies, budget_bytes(cfg.memory_budget))
    reports = {s.name: StepReport(s.name) for s in chain}
    all_mean_rows = {}
    for names in groups:
        sub = dataclasses.replace(ctx, quantizers={n: ctx.quantizers[n] for n in names})
        t = time.perf_counter()
        rows, group_mean_rows = layer_rows(
            sub,
            {n: state.float_weights[n] for n in names},
            {n: state.weights[n] for n in names},
            {n: state.act[n] for n in names if n in state.act},
            {n: per_layer[n] for n in names},
            rows_read=rows_read(chain, cfg.recon_rows),
        )
        timings["sample_rows_s"] = timings.get("sample_rows_s", 0.0) + time.perf_counter() - t
        all_mean_rows.update(group_mean_rows)
        layers = LayerState(
            {n: state.weights[n] for n in names}, {n: state.act[n] for n in names if n in state.act}, rows
        )
        for step in chain:
            t = time.perf_counter()
            with ctx.bar(f"jaxq {step.name}", len(names)) as bar:
                layers, report = LAYER_STEPS[step.name](state.float_weights, layers, step.settings, bar.update)
            reports[step.name].layers.update(report)
            reports[step.name].seconds += time.perf_counter() - t
        state.weights.update(layers.weights)
        state.act.update(layers.act)
        del rows, layers  # the group's rows (held by `layers` too) go before the next group samples its own
        release_freed_memory()
    state.custom_codes |= any(s.name in ("round_opt", "adaround", "gptq") for s in chain)
    if mean_rows:
        state.mean_rows = all_mean_rows
    return list(reports.values())


def _blocks(ctx: Context, state: _State, step: Step, all_layers) -> StepReport:
    """BRECQ / QDrop on the quantized model, through the JAX model
    (`bridge.jax_model.block_reconstruction`); learns without bias correction."""
    from bridge.jax_model.block_reconstruction import choose_blocks, reconstruct_blocks
    from jaxq.block_reconstruction import ReconParams

    state.records = _records(ctx, state)
    apply_records(ctx.quantizers, state.records)
    blocks = choose_blocks(ctx.model, ctx.quantizers, ctx.cfg.recon_blocks)
    release_compiled_programs()

    set_quant = functools.partial(set_quantization, ctx.quantizers)
    with quantization(ctx.quantizers, True), ctx.bar("jaxq blocks", len(blocks), unit="block") as bar:
        state.records, reports = reconstruct_blocks(
            ctx.model,
            ctx.quantizers,
            state.records,
            ctx.calib_data,
            ctx.device,
            ReconParams(
                steps=step.settings.steps,
                keep=step.settings.keep,
                from_codes=step.settings.from_codes,
                holdout=ctx.cfg.recon_holdout,
                hard_final=ctx.cfg.recon_hard_final,
                lr_rounding=ctx.cfg.recon_lr,
                reg_per_variable=ctx.cfg.recon_reg,
            ),
            set_quant,
            blocks,
            bar,
            mesh=ctx.mesh,
            copies=ctx.cfg.recon_augment,
            synthetic=sum(int(b.shape[0]) for b in ctx.synthetic),
            budget=block_program_bytes(ctx.cfg.memory_budget),
        )
    return StepReport(step.name, layers=reports)


_ON_THE_JAX_MODEL = {"blocks": "block reconstruction (keep_acc brecq/qdrop)", "pd_quant": "keep_acc['pd_quant']"}


def _check_lowerable(ctx: Context, steps) -> None:
    """The steps on the JAX model tap module inputs: a layer used through a functional
    call (attention's packed projections) is refused by its full name before the first
    step, so that no calibration is spent on a run that cannot finish."""
    from bridge.jax_model.lower import LoweringError

    what = [_ON_THE_JAX_MODEL[s.name] for s in steps if s.name in _ON_THE_JAX_MODEL]
    functional = [n for n, q in ctx.quantizers.items() if q.functional]
    if what and functional:
        verb = "run" if len(what) > 1 else "runs"
        raise LoweringError(
            f"{' and '.join(what)} {verb} on the JAX model, which taps module inputs only, but layers "
            f"{functional[:3]}{' and more' if len(functional) > 3 else ''} are used through functional calls "
            "(attention's packed projections, F.linear on a module's weight): keep them float "
            f"(QuantConfig.disable_names={functional!r})"
        )


def _pd_quant(ctx: Context, state: _State, step: Step, all_layers) -> StepReport:
    """Input step sizes learned on the whole model's output (`bridge.jax_model.pd_quant`);
    kept only where the held-out output distance falls."""
    from bridge.jax_model.pd_quant import learn_input_scales

    state.records = _records(ctx, state)
    apply_records(ctx.quantizers, state.records)
    release_compiled_programs()
    set_quant = functools.partial(set_quantization, ctx.quantizers)
    desc = f"jaxq pd_quant ({step.settings.steps} steps in one program)"
    with quantization(ctx.quantizers, True), ctx.bar(desc, 1, unit="program") as bar:
        state.records, report = learn_input_scales(
            ctx.model,
            ctx.quantizers,
            state.records,
            ctx.calib_data,
            ctx.device,
            step.settings,
            set_quant,
            holdout=ctx.cfg.recon_holdout,
            seed=ctx.cfg.seed,
            copies=ctx.cfg.recon_augment,
            synthetic=sum(int(b.shape[0]) for b in ctx.synthetic),
            budget=block_program_bytes(ctx.cfg.memory_budget),
        )
        bar.update(1)
        before, after = report.deciding
        bar.set_postfix_str(f"output distance {before:.3g} → {after:.3g}{'' if report.kept else ' (not kept)'}")
    return StepReport(step.name, layers={"model": report})


def _bias_correction(ctx: Context, state: _State, step: Step, all_layers) -> StepReport:
    """`δ = (W − Ŵ)·E[row]` of the final weights; on by default only, a model whose layers
    cannot be sampled is calibrated without it (`BiasCorrectionSkipped` names the layer)."""
    try:
        mean_rows = state.mean_rows if state.mean_rows is not None else mean_rows_of(ctx)
    except (FunctionalLayerError, LayerGeometryError) as e:
        if not ctx.default_bias_correction:
            raise
        warnings.warn(
            f"bias correction (on by default with real calibration data) is left out: {e}. "
            "QuantConfig(bias_correction=False) says so explicitly",
            BiasCorrectionSkipped,
            stacklevel=2,
        )
        return StepReport(step.name, skipped=str(e))
    grouped = {n: _grouped_on_host(ctx.specs[n], state.float_weights[n]) for n in ctx.quantizers}
    corrections = jaxq.accuracy.bias_corrections(mean_rows, grouped, _final_weights(ctx, state))
    state.corrections = {n: np.asarray(d, np.float32) for n, d in corrections.items()}
    bad = [n for n, d in state.corrections.items() if not np.isfinite(d).all()]
    if bad:
        raise FloatingPointError(f"layer {bad[0]!r}: bias correction is not finite (NaN/Inf in its inputs)")
    if state.records is not None:
        state.records = {
            n: dataclasses.replace(r, bias_correction=state.corrections.get(n)) for n, r in state.records.items()
        }
    layers = {n: (float(np.sqrt(np.mean(np.square(d)))), 0.0) for n, d in state.corrections.items()}
    return StepReport(step.name, layers=layers)


def _grouped_on_host(spec, w) -> np.ndarray:
    """`jaxq.rows.grouped_weight` as a NumPy view: an eager `jnp.reshape` compiles a
    program per weight shape (tens of them in a fresh process)."""
    w = np.asarray(w)
    return w.reshape(jaxq.rows.grouped_shape(spec, w.shape))


def _fallback(ctx: Context, state: _State, step: Step, all_layers) -> StepReport:
    """The `amp_num` layers ranked most sensitive by `cfg.amp_metric` (on the quantized
    model) are chosen to return to float; the facade detaches them."""
    from bridge.studies import sensitivity as sens
    from bridge.capture.data import iter_batches
    from bridge.inplace.functional import one_attention_path

    records = _records(ctx, state)
    apply_records(ctx.quantizers, records)
    batches = sens.amp_batches((b for _, b in iter_batches(ctx.calib_data, ctx.device)), ctx.cfg.amp_samples)
    metric = ctx.cfg.amp_metric
    with one_attention_path(), quantization(ctx.quantizers, True):
        table = sens.sensitivity_table(ctx.model, ctx.quantizers, ctx.specs, all_layers or {}, batches, (metric,), None)
    state.fall_back = table.ranked(metric)[: step.settings]
    value = {r["name"]: r[metric] for r in table.rows}
    return StepReport(step.name, layers={n: (value[n], 0.0) for n in state.fall_back})


RUNNERS = {
    "smooth_quant": _smooth_quant,
    "activations": _activations,
    "weights": _weights,
    "round_opt": _round_opt,
    "blocks": _blocks,
    "bias_correction": _bias_correction,
    "pd_quant": _pd_quant,
    "fallback": _fallback,
}


# -- records ----------------------------------------------------------------------------
def _final_weights(ctx: Context, state: _State) -> dict:
    """The quantized weights as they are now: from the records once blocks chose codes."""
    if state.records is None:
        return state.weights
    out = {}
    for name, q in ctx.quantizers.items():
        rec = state.records[name]
        qp = jaxq.QParams(jnp.asarray(rec.weight_scale), jnp.asarray(rec.weight_offset), q.weight_scheme)
        if q.weight_group is not None:
            qp = groupwise.columns(qp, rec.codes.shape[1])
        out[name] = jaxq.QuantizedWeight(qp, jnp.asarray(rec.codes))
    return out


def _records(ctx: Context, state: _State) -> dict[str, LayerRecord]:
    if state.records is not None:
        return state.records
    corrections = state.corrections or {}
    return {
        n: _record(ctx, n, state.weights[n], state.act.get(n), corrections.get(n), not state.custom_codes)
        for n in ctx.quantizers
    }


def _record(ctx: Context, name: str, w: jaxq.QuantizedWeight, act: jaxq.QParams | None, correction, nearest: bool):
    q = ctx.quantizers[name]
    codes = np.asarray(w.q).astype(np.int32)
    scale, offset = weight_params(q, w.qparams)
    custom = not nearest and not is_nearest(
        np.asarray(q.float_weight.detach().float().cpu()), scale, offset, q.weight_scheme, codes
    )
    return LayerRecord(
        weight_scale=scale,
        weight_offset=offset,
        codes=codes,
        custom_codes=custom,
        input_scale=None if act is None else np.asarray(act.scale, np.float32),
        input_offset=None if act is None else np.asarray(act.offset, np.int32),
        bias_correction=None if correction is None else np.asarray(correction, np.float32),
        smoothing=smoothing_of(q),
    )


def _by_scheme(ctx: Context) -> dict:
    groups: dict = {}
    for name, q in ctx.quantizers.items():
        groups.setdefault(q.weight_scheme, []).append(name)
    return groups


def _check_weights(float_weights: dict) -> None:
    for name, w in float_weights.items():
        if not bool(np.isfinite(np.asarray(w)).all()):
            raise FloatingPointError(
                f"layer {name!r}: its weight contains NaN or Inf; fix the model or keep it in float (disable_names)"
            )


__all__ = ["BiasCorrectionSkipped", "PipelineResult", "StepReport", "plan", "run_pipeline"]
