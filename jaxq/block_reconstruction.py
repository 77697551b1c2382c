"""Block reconstruction: BRECQ (Li et al., ICLR 2021) and QDrop (Wei et al., ICLR 2022).

A block (a residual unit, a transformer layer) is a pure function of its learnable
quantizers. Every weight in it gets AdaRound's soft rounding (`jaxq.adaround`):

    W̃ = (clamp(⌊W/s⌋ + o + h(V), qmin, qmax) − o)·s,      h = rectified sigmoid

and every input quantizer a learned step size `s_a = s_a⁰·exp(u)` (LSQ's gradient through
straight-through rounding, `jaxq.model_quant`). They minimise the block-output error
against the float block plus the annealed rounding regulariser:

    L = E_batch[ Σ_features (f_q(x̃) − f(x))² ] + λ Σ (1 − |2h(V) − 1|^β),   β: 20 → 2 after warm-up

`x̃` is the block's input in the quantized model (earlier blocks already reconstructed).
QDrop: inside the block each input quantizer keeps its quantized value with probability
`keep` per element and passes the float value otherwise (`keep = 1`: BRECQ).

`optimise(...)` runs all steps in one `lax.scan` (one compilation per block structure);
the final codes round `h` at ½.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxq.adaround import (
    RoundingSchedule,
    beta_schedule,
    initial_logits,
    rectified_sigmoid,
    regulariser_weight,
    rounding_reg,
)


class ReconParams(NamedTuple):
    """Hyper-parameters; steps and batch sized for CPU (BRECQ's paper: 20 000 × 32)."""

    steps: int = 300
    batch: int = 16
    schedule: RoundingSchedule = RoundingSchedule()
    lr_rounding: float = 1e-2
    lr_scale: float = 1e-3  # on u, the log of the step size's change
    keep: float = 1.0  # QDrop's probability of keeping an activation quantized (0.5); 1: BRECQ
    from_codes: bool = False  # start the rounding from the records' codes (e.g. GPTQ's)


class SoftWeight(NamedTuple):
    """A weight's fixed rounding base: `⌊W/s⌋`, and its quantizer (arrays broadcast to `W`)."""

    base: jax.Array
    scale: jax.Array
    offset: jax.Array
    qmin: jax.Array
    qmax: jax.Array


def soft_weight_init(
    w: jax.Array, scale: jax.Array, offset: jax.Array, qmin, qmax, start: jax.Array | None = None
) -> tuple[SoftWeight, jax.Array]:
    """`(SoftWeight, V₀)` of `w` (`[out, …]`, per-channel `scale`/`offset` `[out]`): `V₀`
    puts `h(V₀)` at the fractional part, so `W̃ = W` inside the grid — or, with `start`
    (codes of `w`'s shape), at those codes moved to the nearer of ⌊W/s⌋ and ⌈W/s⌉."""
    w = jnp.asarray(w, jnp.float32)
    shape = (-1,) + (1,) * (w.ndim - 1)
    scale = jnp.reshape(jnp.asarray(scale, jnp.float32), shape)
    offset = jnp.reshape(jnp.asarray(offset, jnp.float32), shape)
    x = w / scale
    base = jnp.floor(x)
    rest = x - base if start is None else jnp.clip(jnp.asarray(start, jnp.float32) - offset - base, 0.0, 1.0)
    v0 = initial_logits(rest)
    return SoftWeight(base, scale, offset, jnp.float32(qmin), jnp.float32(qmax)), v0


def soft_weight(sw: SoftWeight, v: jax.Array, hard: bool = False) -> jax.Array:
    """`W̃` (soft: `h(V)`; hard: `h ≥ ½`)."""
    h = rectified_sigmoid(v)
    h = (h >= 0.5).astype(jnp.float32) if hard else h
    return (jnp.clip(sw.base + sw.offset + h, sw.qmin, sw.qmax) - sw.offset) * sw.scale


def hard_codes(sw: SoftWeight, v: jax.Array) -> jax.Array:
    """The integer codes `q` of the hard-rounded `W̃ = (q − o)·s`."""
    h = (rectified_sigmoid(v) >= 0.5).astype(jnp.float32)
    return jnp.clip(sw.base + sw.offset + h, sw.qmin, sw.qmax).astype(jnp.int32)


def output_error(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`E[Σ_features (pred − target)²]`: summed over the feature axis (channels of NCHW,
    the last axis otherwise), averaged over the rest (BRECQ's reconstruction loss) or over
    the positions where `mask` (e.g. `[samples, tokens]`, padding 0) is set."""
    d = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    per_position = jnp.sum(d, axis=1 if d.ndim == 4 else -1)
    if mask is None:
        return jnp.mean(per_position)
    m = jnp.broadcast_to(
        jnp.reshape(mask.astype(jnp.float32), mask.shape + (1,) * (per_position.ndim - mask.ndim)), per_position.shape
    )
    return jnp.sum(per_position * m) / jnp.maximum(jnp.sum(m), 1.0)


class Learned(NamedTuple):
    v: dict  # weight key → V
    u: dict  # layer → log step-size change


def optimise(
    apply: Callable,
    learned: Learned,
    inputs,
    target: jax.Array,
    key: jax.Array,
    p: ReconParams,
    mask: jax.Array | None = None,
) -> tuple[Learned, jax.Array, jax.Array]:
    """Minimise `L` (module docstring) over `learned` with adam; `apply(learned, batch_inputs,
    key | None)` is the block's quantized output on a batch (key: QDrop's drops, None:
    none). `inputs`: pytree of arrays with the sample axis first, `target` and `mask`
    (positions that count, e.g. real tokens; None: all) likewise.
    Returns the learned values and the output error before and after (hard rounding, no
    drop, first 32 samples)."""
    n = target.shape[0]
    opt = optax.multi_transform({"v": optax.adam(p.lr_rounding), "u": optax.adam(p.lr_scale)}, Learned("v", "u"))

    def loss(lv, idx, step, k):
        batch = jax.tree.map(lambda a: a[idx], inputs)
        out = apply(lv, batch, k if p.keep < 1.0 else None)
        rec = output_error(out, target[idx], None if mask is None else mask[idx])
        reg = sum(rounding_reg(v, beta_schedule(step, p.steps, p.schedule)) for v in jax.tree.leaves(lv.v))
        return rec + regulariser_weight(step, p.steps, p.schedule) * reg

    def step_fn(carry, step):
        lv, state = carry
        k_idx, k_drop = jax.random.split(jax.random.fold_in(key, step))
        idx = jax.random.choice(k_idx, n, (min(p.batch, n),), replace=False)
        grads = jax.grad(loss)(lv, idx, step.astype(jnp.float32), k_drop)
        updates, state = opt.update(grads, state, lv)
        return (optax.apply_updates(lv, updates), state), None

    before = _whole_set_error(apply, _hardened(learned), inputs, target, mask)
    (learned, _), _ = jax.lax.scan(step_fn, (learned, opt.init(learned)), jnp.arange(p.steps))
    return learned, before, _whole_set_error(apply, _hardened(learned), inputs, target, mask)


def _hardened(lv: Learned) -> Learned:
    """`V` pushed to ±∞ on its side of ½, so `h(V)` is exactly 0 or 1 (hard rounding)."""
    return Learned(jax.tree.map(lambda v: jnp.where(rectified_sigmoid(v) >= 0.5, 1e4, -1e4), lv.v), lv.u)


def _whole_set_error(apply, lv, inputs, target, mask, most: int = 32):
    """The output error on the first `most` samples (a report, not an objective)."""
    m = min(most, target.shape[0])
    return output_error(
        apply(lv, jax.tree.map(lambda a: a[:m], inputs), None), target[:m], None if mask is None else mask[:m]
    )
