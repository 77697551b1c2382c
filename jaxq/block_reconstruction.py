"""Block reconstruction: BRECQ (Li et al., ICLR 2021) and QDrop (Wei et al., ICLR 2022).

A block (a residual unit, a transformer layer) is a pure function of its learnable
quantizers. Every weight in it gets AdaRound's soft rounding (`jaxq.adaround`):

    W̃ = (clamp(⌊W/s⌋ + o + h(V), qmin, qmax) − o)·s,      h = rectified sigmoid

and every input quantizer a learned step size `s_a = s_a⁰·exp(u)` (LSQ's gradient through
straight-through rounding, `jaxq.model_quant`). They minimise the block-output error
against the float block plus the annealed rounding regulariser:

    L = E_batch[ Σ_features (f_q(x̃) − f(x))² ] + λ Σ (1 − |2h(V) − 1|^β),   β: 20 → 2 after warm-up

`x̃` is the block's input in the quantized model (earlier blocks already reconstructed).
With `reg_per_variable = λₙ > 0` both terms are normalised per block (`loss_weights`): the
error over its value under round to nearest, the regulariser per rounding variable.
QDrop: inside the block each input quantizer keeps its quantized value with probability
`keep` per element (`keep_mask`) and passes the float value otherwise (`keep = 1`: BRECQ).

`optimise(...)` runs all steps in one `lax.scan` (one compilation per block structure);
the final codes round `h` at ½. With `hard_final > 0` the last share of the steps holds
the rounding at those codes and learns only the step sizes, against the hard rounding
that will be deployed. With a held-out split (`holdout_split`: whole calibration
images and all their augmented copies set aside, never fitted) it measures the held-out
error of the hard rounding `checks` times along the way and keeps the best of those states
and the start — the step at which to stop is chosen on images the fit never saw.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

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
    lr_rounding: float = 0.05  # QuantConfig.recon_lr: Adam moves each V by about this per step
    lr_scale: float = 1e-3  # on u, the log of the step size's change
    keep: float = 1.0  # QDrop's probability of keeping an activation quantized (0.5); 1: BRECQ
    from_codes: bool = False  # start the rounding from the records' codes (e.g. GPTQ's)
    holdout: float = 0.0  # share of the calibration images held out (`holdout_split`); 0: none
    checks: int = 4  # held-out measurements, evenly spaced; the last at the final step
    hard_final: float = 0.0  # share of the steps, at the end, with the rounding held hard (`soft_steps`)
    micro_batch: int = 0  # samples per gradient pass (`micro_batch_size`); 0: the whole mini-batch at once
    reg_per_variable: float = 0.0  # λₙ (`loss_weights`); 0: the papers' loss (QuantConfig.recon_reg: 1000)


def _mix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: each input bit flips each output bit with probability ~½."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(key: jax.Array, keep: float, shape: tuple[int, ...]) -> jax.Array:
    """QDrop's per-element draws: True (keep the quantized value) with probability `keep`.

    A counter-based hash instead of threefry's stream: with `s₁, s₂` two words drawn from
    `key` and `i` an element's flat position (mod 2³²),

        u = ⌊mix(mix(i·φ + s₁) ⊕ s₂) / 2⁸⌋ · 2⁻²⁴,   kept ⇔ u < keep

    (`mix`: murmur3's finaliser, `φ = 0x9E3779B9`). Dropout needs draws independent of one
    another and of the key, not a cryptographic stream; this fuses into the quantizer's
    elementwise loop, where threefry cost more than the block's forward on CPU
    (`benchmarks/README.md`)."""
    s1, s2 = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= shape[axis]
    h = _mix32(_mix32(index * jnp.uint32(0x9E3779B9) + s1) ^ s2)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24) < keep


def micro_batch_size(batch: int, micro_batch: int) -> int:
    """The largest divisor of `batch` that is at most `micro_batch` (0: `batch`). A step's
    gradient is the sum of its parts' gradients (the same loss, a fraction of the memory:
    a part's activations are what the program holds for the backward pass); QDrop draws
    each part's drops from its own key."""
    if micro_batch <= 0 or micro_batch >= batch:
        return batch
    return max(d for d in range(1, micro_batch + 1) if batch % d == 0)


def soft_steps(p: ReconParams) -> int:
    """Steps that learn the soft rounding; the regulariser's schedule runs over them. The
    remaining `hard_final` share holds every `V` at its hard rounding and learns only the
    step sizes, so the state kept is the one that was fitted (no rounding flips after)."""
    return p.steps - int(round(p.hard_final * p.steps))


MOST_HELD = 32  # held-out images at most (the held-out error is measured on all of them at once)
MOST_REPORTED = 32  # fitted samples the fitted error is reported on


class Split(NamedTuple):
    """Sample indices of the captured pool: `fit` (steps draw their mini-batches from
    these) and `held` (whole images, never fitted, nor any augmented copy of them)."""

    fit: jax.Array
    held: jax.Array


def holdout_sizes(n: int, images: int, share: float, extra: int = 0) -> tuple[int, int]:
    """`(held-out images, fitted samples)` of `holdout_split` (static sizes)."""
    if share <= 0 or images < 2:
        return 0, n
    held = min(max(1, int(images * share)), images - 1, MOST_HELD)
    return held, n - held * ((n - extra) // images)


def holdout_split(key: jax.Array, n: int, images: int, share: float, extra: int = 0) -> Split:
    """A random `share` of the `images` calibration images held out (at least one when there
    are two or more, at most `MOST_HELD`, never all). The pool of `n` samples is the images
    (`0 … images−1`), augmented copies of them in the same order (sample `i` comes from image
    `i mod images`), then `extra` samples that are always fitted (synthetic images); every
    sample of a held-out image leaves the fitted part. `n`, `images`, `share`, `extra` are
    static."""
    if (n - extra) % images:
        raise ValueError(f"holdout_split: {n - extra} samples are not whole copies of {images} images")
    held_n, fit_n = holdout_sizes(n, images, share, extra)
    held = jnp.sort(jax.random.permutation(key, images)[:held_n])
    is_held = jnp.zeros(images, bool).at[held].set(True)
    i = jnp.arange(n)
    fitted = (i >= n - extra) | ~is_held[i % images]
    return Split(jnp.nonzero(fitted, size=fit_n)[0], held)


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
    """`(SoftWeight, V₀)` of `w` (`[out, …]`; `scale`/`offset` per channel `[out]` or per
    element, `w`'s shape, as weight groups are in `jaxq.model_quant.LayerQState`): `V₀`
    puts `h(V₀)` at the fractional part, so `W̃ = W` inside the grid — or, with `start`
    (codes of `w`'s shape), at those codes moved to the nearer of ⌊W/s⌋ and ⌈W/s⌉."""
    w = jnp.asarray(w, jnp.float32)
    shape = w.shape if jnp.ndim(scale) == w.ndim else (-1,) + (1,) * (w.ndim - 1)
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
    total, count = output_error_sums(pred, target, mask)
    return total / jnp.maximum(count, 1.0)


def output_error_sums(
    pred: jax.Array, target: jax.Array, mask: jax.Array | None = None, weight: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """`(Σ, count)` of `output_error` (its mean is `Σ / count`), so parts of a sample set
    add up; `weight` (`[samples]`, 0 or 1) leaves samples out."""
    d = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    per_position = jnp.sum(d, axis=1 if d.ndim == 4 else -1)
    m = jnp.ones(per_position.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    if weight is not None:
        m = m * jnp.reshape(weight, weight.shape + (1,) * (m.ndim - 1))
    m = jnp.broadcast_to(jnp.reshape(m, m.shape + (1,) * (per_position.ndim - m.ndim)), per_position.shape)
    return jnp.sum(per_position * m), jnp.sum(m)


def loss_weights(p: ReconParams, error_before: jax.Array, variables: int) -> tuple[jax.Array, jax.Array]:
    """`(a, b)` of the loss `a·E[Σ (f_q − f)²] + b·w(t)·Σ reg` (`w(t)`: the schedule's
    `reg` after warm-up). BRECQ's loss (`reg_per_variable = 0`): `a = 1`, `b = 1`. Normalised
    per block (`λₙ = reg_per_variable`):

        L = E[Σ (f_q − f)²] / e₀ + λₙ·(w(t)/reg)·Σ reg / N_V

    with `e₀` the block's error under round to nearest and `N_V` its rounding variables:
    both terms are ~1 at the start whatever the block's activation scale and size, so one
    λₙ balances every block. Unnormalised, the balance `reg·N_V / e₀` differs by orders of
    magnitude between blocks and models, and blocks with large outputs end with part of
    their rounding soft (measured in `benchmarks/README.md`)."""
    if p.reg_per_variable <= 0:
        return jnp.float32(1.0), jnp.float32(1.0)
    a = 1.0 / jnp.maximum(error_before, jnp.float32(1e-30))
    if p.schedule.reg <= 0:  # the regulariser is off
        return a, jnp.float32(0.0)
    return a, jnp.float32(p.reg_per_variable / (p.schedule.reg * max(variables, 1)))


class Learned(NamedTuple):
    v: dict  # weight key → V
    u: dict  # layer → log step-size change


class ReconErrors(NamedTuple):
    """Block-output errors (hard rounding, no drop) at the start and of the kept state."""

    fitted_before: jax.Array  # on the first `MOST_REPORTED` fitted samples
    fitted_after: jax.Array
    held_before: jax.Array  # on the held-out images; NaN without a split
    held_after: jax.Array
    kept_step: jax.Array  # the step whose state was kept (0: the start)
    hard_share: jax.Array  # share of `h(V)` exactly 0 or 1 in the kept state


def optimise(
    apply: Callable,
    learned: Learned,
    inputs,
    target: jax.Array,
    key: jax.Array,
    p: ReconParams,
    mask: jax.Array | None = None,
    split: Split | None = None,
) -> tuple[Learned, ReconErrors]:
    """Minimise `L` (module docstring) over `learned` with adam; `apply(learned, batch_inputs,
    key | None)` is the block's quantized output on a batch (key: QDrop's drops, None:
    none). `inputs`: pytree of arrays with the sample axis first, `target` and `mask`
    (positions that count, e.g. real tokens; None: all) likewise.
    `split`: mini-batches come from `split.fit`, and the state kept is the one of lowest
    held-out error among the start and `p.checks` evenly spaced steps; None: every sample
    is fitted and the final state is kept."""
    import optax  # here, not at the top: a run that learns nothing does not import it (0.3 s)

    n = target.shape[0]
    fit = jnp.arange(n) if split is None else split.fit
    opt = optax.multi_transform({"v": optax.adam(p.lr_rounding), "u": optax.adam(p.lr_scale)}, Learned("v", "u"))
    take = lambda idx: (  # noqa: E731
        jax.tree.map(lambda a: a[idx], inputs),
        target[idx],
        None if mask is None else mask[idx],
    )

    soft = soft_steps(p)
    batch = min(p.batch, fit.shape[0])
    micro = micro_batch_size(batch, p.micro_batch)

    def regulariser(lv, step):
        reg = sum(rounding_reg(v, beta_schedule(step, soft, p.schedule)) for v in jax.tree.leaves(lv.v))
        return reg_weight * regulariser_weight(step, soft, p.schedule) * reg

    def loss(lv, idx, step, k):
        x, y, m = take(idx)
        return error_weight * output_error(apply(lv, x, k if p.keep < 1.0 else None), y, m) + regulariser(lv, step)

    def gradient(lv, idx, step, k):
        """`∇L` on the mini-batch `idx`; in parts of `micro` samples when it is smaller."""
        if micro == batch:
            return jax.grad(loss)(lv, idx, step, k)
        parts = idx.reshape(batch // micro, micro)
        _, y, m = take(idx)
        _, count = output_error_sums(y, y, m)

        def part(total, j):
            def error_sum(lv):
                x, y, m = take(parts[j])
                drops = jax.random.fold_in(k, j) if p.keep < 1.0 else None
                return error_weight * output_error_sums(apply(lv, x, drops), y, m)[0] / jnp.maximum(count, 1.0)

            return jax.tree.map(jnp.add, total, jax.grad(error_sum)(lv)), None

        total, _ = jax.lax.scan(part, jax.grad(regulariser)(lv, step), jnp.arange(parts.shape[0]))
        return total

    def step_fn(carry, step):
        def run(carry):
            lv, state = carry
            if soft < p.steps:  # the hard phase: V held at its hard rounding (h exactly 0 or 1)
                lv = Learned(jax.tree.map(lambda v, h: jnp.where(step >= soft, h, v), lv.v, _hardened(lv).v), lv.u)
            k_idx, k_drop = jax.random.split(jax.random.fold_in(key, step))
            idx = fit[jax.random.choice(k_idx, fit.shape[0], (batch,), replace=False)]
            grads = gradient(lv, idx, step.astype(jnp.float32), k_drop)
            updates, state = opt.update(grads, state, lv)
            if soft < p.steps:
                updates = Learned(jax.tree.map(lambda d: jnp.where(step >= soft, 0.0, d), updates.v), updates.u)
            return optax.apply_updates(lv, updates), state

        return jax.lax.cond(step < p.steps, run, lambda c: c, carry), None

    def error_on(lv, idx):
        """The hard rounding's output error on samples `idx`, `p.batch` at a time (all at
        once, the block's activations on 32 samples were most of the program's memory)."""
        chunk = min(p.batch, idx.shape[0])
        chunks = -(-idx.shape[0] // chunk)
        pad = chunks * chunk - idx.shape[0]
        valid = jnp.concatenate([jnp.ones(idx.shape, jnp.float32), jnp.zeros((pad,), jnp.float32)])
        idx = jnp.concatenate([idx, jnp.broadcast_to(idx[:1], (pad,))])
        hard = _hardened(lv)

        def part(args):
            i, w = args
            x, y, m = take(i)
            return output_error_sums(apply(hard, x, None), y, m, w)

        total, count = jax.lax.map(part, (idx.reshape(chunks, chunk), valid.reshape(chunks, chunk)))
        return jnp.sum(total) / jnp.maximum(jnp.sum(count), 1.0)

    reported = fit[: min(MOST_REPORTED, fit.shape[0])]
    fitted_before = error_on(learned, reported)
    variables = sum(v.size for v in jax.tree.leaves(learned.v))
    error_weight, reg_weight = loss_weights(p, jax.lax.stop_gradient(fitted_before), variables)
    if split is None or split.held.shape[0] == 0:
        (kept, _), _ = jax.lax.scan(step_fn, (learned, opt.init(learned)), jnp.arange(p.steps))
        nan = jnp.float32(jnp.nan)
        return kept, ReconErrors(
            fitted_before, error_on(kept, reported), nan, nan, jnp.int32(p.steps), hard_share(kept)
        )
    checks = max(1, min(p.checks, p.steps))
    every = -(-p.steps // checks)
    held_before = error_on(learned, split.held)

    def segment(carry, c):
        lv, state, kept, best, kept_step = carry
        (lv, state), _ = jax.lax.scan(step_fn, (lv, state), c * every + jnp.arange(every))
        err = error_on(lv, split.held)
        better = err < best
        kept = jax.tree.map(lambda a, b: jnp.where(better, a, b), lv, kept)
        done = jnp.minimum((c + 1) * every, p.steps)
        return (lv, state, kept, jnp.where(better, err, best), jnp.where(better, done, kept_step)), None

    carry = (learned, opt.init(learned), learned, held_before, jnp.int32(0))
    (_, _, kept, held_after, kept_step), _ = jax.lax.scan(segment, carry, jnp.arange(checks))
    return kept, ReconErrors(
        fitted_before, error_on(kept, reported), held_before, held_after, kept_step, hard_share(kept)
    )


def hard_share(lv: Learned) -> jax.Array:
    """Share of the rounding variables whose `h(V)` is exactly 0 or 1."""
    hs = [rectified_sigmoid(v) for v in jax.tree.leaves(lv.v)]
    if not hs:
        return jnp.float32(1.0)
    hard = sum(jnp.sum((h == 0.0) | (h == 1.0)) for h in hs)
    return hard / sum(h.size for h in hs)


def _hardened(lv: Learned) -> Learned:
    """`V` pushed to ±∞ on its side of ½, so `h(V)` is exactly 0 or 1 (hard rounding)."""
    return Learned(jax.tree.map(lambda v: jnp.where(rectified_sigmoid(v) >= 0.5, 1e4, -1e4), lv.v), lv.u)
