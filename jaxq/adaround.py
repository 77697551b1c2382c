"""AdaRound (Nagel et al., ICML 2020): learned rounding by layer-output reconstruction.

With per-channel `(s, o)` fixed, each code is `floor(W · (1/s)) + o` plus a learned
`h(V) ∈ [0, 1]`, the rectified sigmoid:

    h(V) = clip(sigmoid(V)·(ζ − γ) + γ, 0, 1),         ζ = 1.1,  γ = −0.1
    W̃    = (clamp(floor(W/s) + o + h(V), qmin, qmax) − o)·s

minimising the layer-output error on calibration rows plus an annealed regulariser that
drives every `h` to 0 or 1:

    L(V) = E‖(W̃ − W)·x̂‖² + λ Σ (1 − |2h(V) − 1|^β),   β: 20 → 2 after a warm-up

`x̂` is the layer's fake-quantized input row, so the rounding is fitted to the inputs the
quantized layer really sees. (Fitting `W̃x̂` to the float `Wx` instead, so that the
rounding also absorbs the activation quantizer's error, overfits the calibration rows:
worse than round to nearest on MiniLM W4A8, `benchmarks/README.md`.) The expectation only
needs the second moment of the rows:

    E‖(W̃ − W)x̂‖² = Σ_c Δw_c Ĥ Δw_cᵀ,    Ĥ = E[x̂x̂ᵀ] = RᵀR,   R = x̂/√m   (per group)

With `m` rows of width `d` the moment is kept as `Ĥ` (`[d, d]`, one step `O(out·d²)`) when
`d ≤ m`, else as its factor `R` (`[m, d]`, one step `O(out·m·d)`): a conv whose rows are
65,536 wide needs 512 MiB for `R` where `Ĥ` would take 16 GiB.

`V` starts where `h(V)` equals the fractional part (so `W̃ = W` inside the grid) and is
optimised with `optax.adam`; the final codes round `h` at 0.5.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxq.numerics import _broadcastable, fake_quant
from jaxq.qparams import QParams

ZETA, GAMMA = 1.1, -0.1


class RoundingSchedule(NamedTuple):
    """The rounding regulariser's schedule (the paper's defaults): off for the first
    `warmup`·steps, then weighted `reg` with β annealed from `beta_start` to `beta_end`.
    Shared by AdaRound and block reconstruction."""

    reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2


class AdaRoundParams(NamedTuple):
    """Hyper-parameters (learning rate for ~1000 steps)."""

    steps: int = 1000
    schedule: RoundingSchedule = RoundingSchedule()
    learning_rate: float = 1e-2


class Moments(NamedTuple):
    """Second moment `Ĥ = E[x̂x̂ᵀ]` `[g, d, d]` of a layer's quantized input rows."""

    h_hat: jax.Array


class RowFactor(NamedTuple):
    """The same second moment as its factor `R = x̂/√m` `[g, m, d]` (`Ĥ = RᵀR`), for rows
    wider than they are many."""

    r: jax.Array


def times_moment(delta: jax.Array, mom: Moments | RowFactor) -> jax.Array:
    """`Δ·Ĥ` for `Δ` `[g, o, d]`."""
    if isinstance(mom, RowFactor):
        inner = jnp.einsum("god,gmd->gom", delta, mom.r, precision=lax.Precision.HIGHEST)
        return jnp.einsum("gom,gmd->god", inner, mom.r, precision=lax.Precision.HIGHEST)
    return jnp.einsum("god,gde->goe", delta, mom.h_hat, precision=lax.Precision.HIGHEST)


class AdaRoundResult(NamedTuple):
    q: jax.Array  # int32 codes, shape of the weight
    error_before: jax.Array  # E‖(Ŵ_rtn − W)·x̂‖²
    error_after: jax.Array  # E‖(W̃ − W)·x̂‖²


def row_moments(rows: jax.Array, act: QParams | None) -> Moments | RowFactor:
    """`Ĥ = E[x̂x̂ᵀ]` of rows `[m, g, d]` with `x̂ = fq(rows)` (the rows if `act` is None),
    as `Moments` when `d ≤ m`, else as its `RowFactor` (the smaller of the two)."""
    x_hat = rows if act is None else fake_quant(rows, act)
    m, _, d = rows.shape
    if d > m:
        return RowFactor(jnp.swapaxes(x_hat, 0, 1) / jnp.sqrt(jnp.float32(m)))
    return Moments(_outer_sum(x_hat) / m)


def _outer_sum(x_hat: jax.Array) -> jax.Array:
    return jnp.einsum("mgd,mge->gde", x_hat, x_hat, precision=lax.Precision.HIGHEST)


@jax.jit
def moment_sum(rows: jax.Array, act: QParams | None, valid: jax.Array) -> jax.Array:
    """`Σ x̂x̂ᵀ` `[g, d, d]` over the rows `[c, g, d]` where `valid` `[c]` is True: one chunk
    of `row_moments`' sum (`Ĥ = Σ_chunks / m`), so no more than a chunk is ever on device."""
    return _outer_sum((rows if act is None else fake_quant(rows, act)) * valid[:, None, None].astype(rows.dtype))


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def output_error(w_tilde_g: jax.Array, wg: jax.Array, mom: Moments | RowFactor) -> jax.Array:
    """`E‖(W̃ − W)x̂‖²` from the moment (weights `[g, o, d]`)."""
    delta = w_tilde_g - wg
    return jnp.sum(times_moment(delta, mom) * delta)


def initial_logits(rest: jax.Array) -> jax.Array:
    """`V` with `h(V) = rest` (the fractional part of `W/s`), so soft rounding starts at `W`."""
    rest = jnp.clip(rest, 1e-4, 1 - 1e-4)
    return -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def rounding_reg(v: jax.Array, beta) -> jax.Array:
    """`Σ (1 − |2h(V) − 1|^β)`: zero when every `h` is 0 or 1."""
    return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_schedule(step, steps: int, s: RoundingSchedule):
    """β of the regulariser: `beta_start` until `warmup·steps`, then linearly to `beta_end`."""
    start = s.warmup * steps
    rel = jnp.clip((step - start) / jnp.maximum(steps - start, 1.0), 0.0, 1.0)
    return s.beta_end + (s.beta_start - s.beta_end) * (1.0 - rel)


def regulariser_weight(step, steps: int, s: RoundingSchedule):
    """`reg` once the warm-up is over, else 0."""
    return jnp.where(step >= s.warmup * steps, s.reg, 0.0)


def adaround(
    w: jax.Array,
    wg_shape: tuple[int, int, int],
    qp: QParams,
    mom: Moments | RowFactor,
    p: AdaRoundParams,
    start: jax.Array | None = None,
) -> AdaRoundResult:
    """Learned codes for weight `w` (`[out, …]`, per-channel `qp` on axis 0). With `start`
    (codes of `w`'s shape, e.g. GPTQ's) `V` starts at those codes, each moved to the
    nearer of ⌊W/s⌋ and ⌈W/s⌉, and the error before is theirs."""
    import optax  # here, not at the top: a run that learns nothing does not import it (0.3 s)

    w = jnp.asarray(w, jnp.float32)
    inv = _broadcastable(jnp.float32(1.0) / qp.scale, qp, w.ndim)
    off = _broadcastable(qp.offset.astype(jnp.float32), qp, w.ndim)
    scale = _broadcastable(qp.scale, qp, w.ndim)
    x = w * inv
    base = jnp.floor(x)
    qmin, qmax = qp.scheme.qmin, qp.scheme.qmax
    if start is None:
        v0 = initial_logits(x - base)
    else:
        v0 = initial_logits(jnp.clip(start.astype(jnp.float32) - off - base, 0.0, 1.0))

    def weight_of(h):
        return (jnp.clip(base + off + h, qmin, qmax) - off) * scale

    wg = jnp.reshape(w, wg_shape)

    def surrogate(v, grad_w, step):
        # ∂recon/∂W̃ = 2(W̃ − W)Ĥ is computed once per step outside autodiff, so the step
        # costs one product with the moment (`times_moment`); sum(W̃ · ∂recon/∂W̃) has the same gradient in V.
        reg = rounding_reg(v, beta_schedule(step, p.steps, p.schedule))
        return (
            jnp.sum(jnp.reshape(weight_of(rectified_sigmoid(v)), wg_shape) * grad_w)
            + regulariser_weight(step, p.steps, p.schedule) * reg
        )

    opt = optax.adam(p.learning_rate)

    def step_fn(carry, step):
        v, state = carry
        delta = jnp.reshape(weight_of(rectified_sigmoid(v)), wg_shape) - wg
        grad_w = 2.0 * times_moment(delta, mom)
        grads = jax.grad(surrogate)(v, grad_w, step.astype(jnp.float32))
        updates, state = opt.update(grads, state, v)
        return (optax.apply_updates(v, updates), state), None

    (v, _), _ = lax.scan(step_fn, (v0, opt.init(v0)), jnp.arange(p.steps))
    hard = (rectified_sigmoid(v) >= 0.5).astype(jnp.float32)
    q = jnp.clip(base + off + hard, qmin, qmax)
    w_before = fake_quant(w, qp) if start is None else (start.astype(jnp.float32) - off) * scale
    return AdaRoundResult(
        q.astype(jnp.int32),
        output_error(jnp.reshape(w_before, wg_shape), wg, mom),
        output_error(jnp.reshape(weight_of(hard), wg_shape), wg, mom),
    )


@functools.partial(jax.jit, static_argnames=("wg_shape", "params"))
def adaround_bucket(ws, wg_shape, qps, moms, params: AdaRoundParams, starts=None) -> AdaRoundResult:
    """`adaround` over a stacked bucket of equal-shaped layers (`starts`: their start codes, or None)."""
    if starts is None:
        return jax.vmap(lambda w, qp, mom: adaround(w, wg_shape, qp, mom, params))(ws, qps, moms)
    return jax.vmap(lambda w, qp, mom, s: adaround(w, wg_shape, qp, mom, params, s))(ws, qps, moms, starts)
