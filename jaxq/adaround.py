"""AdaRound (Nagel et al., ICML 2020): learned rounding by layer-output reconstruction.

With per-channel `(s, o)` fixed, each code is `floor(W · (1/s)) + o` plus a learned
`h(V) ∈ [0, 1]`, the rectified sigmoid:

    h(V) = clip(sigmoid(V)·(ζ − γ) + γ, 0, 1),         ζ = 1.1,  γ = −0.1
    W̃    = (clamp(floor(W/s) + o + h(V), qmin, qmax) − o)·s

minimising the layer-output error on calibration rows plus an annealed regulariser that
drives every `h` to 0 or 1:

    L(V) = E‖W̃·x̂ − W·x‖² + λ Σ (1 − |2h(V) − 1|^β),   β: 20 → 2 after a warm-up

`x` is the float model's input row and `x̂` the fake-quantized input row of the quantized
model at the same position, so the rounding also compensates the activation quantizer and
the error arriving from earlier layers. The expectation only needs the second moments of the rows, so one step costs
`O(out · d²)` whatever the number of rows:

    E‖W̃x̂ − Wx‖² = Σ_c w̃_c Ĥ w̃_cᵀ − 2 w̃_c C w_cᵀ + w_c H w_cᵀ,
    Ĥ = E[x̂x̂ᵀ],  C = E[x̂xᵀ],  H = E[xxᵀ]   (per group)

`V` starts where `h(V)` equals the fractional part (so `W̃ = W` inside the grid) and is
optimised with `optax.adam`; the final codes round `h` at 0.5.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxq.numerics import _broadcastable, fake_quant
from jaxq.qparams import QParams

ZETA, GAMMA = 1.1, -0.1


class AdaRoundParams(NamedTuple):
    """Hyper-parameters (defaults of the paper, learning rate for ~1000 steps)."""

    steps: int = 1000
    reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    learning_rate: float = 1e-2


class Moments(NamedTuple):
    """Second moments of a layer's rows, per group: `Ĥ`, `C` `[g, d, d]` and `H`."""

    h_hat: jax.Array
    cross: jax.Array
    h: jax.Array


class AdaRoundResult(NamedTuple):
    q: jax.Array          # int32 codes, shape of the weight
    error_before: jax.Array  # E‖Ŵ_rtn·x̂ − W·x‖²
    error_after: jax.Array   # E‖W̃·x̂ − W·x‖²


def row_moments(rows: jax.Array, target: jax.Array, act: QParams | None) -> Moments:
    """`Ĥ = E[x̂x̂ᵀ]`, `C = E[x̂xᵀ]`, `H = E[xxᵀ]` from quantized-model rows (`x̂ = fq(rows)`)
    and float rows `target` `[m, g, d]` at the same positions."""
    x_hat = rows if act is None else fake_quant(rows, act)
    m = rows.shape[0]
    mom = lambda a, b: jnp.einsum("mgd,mge->gde", a, b, precision=lax.Precision.HIGHEST) / m  # noqa: E731
    return Moments(mom(x_hat, x_hat), mom(x_hat, target), mom(target, target))


row_moments_bucket = jax.jit(jax.vmap(row_moments))


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def output_error(w_tilde_g: jax.Array, wg: jax.Array, mom: Moments) -> jax.Array:
    """`E‖W̃x̂ − Wx‖²` from the moments (weights `[g, o, d]`)."""
    quad = jnp.sum(jnp.einsum("god,gde->goe", w_tilde_g, mom.h_hat, precision=lax.Precision.HIGHEST) * w_tilde_g)
    cross = jnp.sum(jnp.einsum("god,ged->goe", wg, mom.cross, precision=lax.Precision.HIGHEST) * w_tilde_g)
    const = jnp.sum(jnp.einsum("god,gde->goe", wg, mom.h, precision=lax.Precision.HIGHEST) * wg)
    return quad - 2.0 * cross + const


def _beta(step, p: AdaRoundParams):
    start = p.warmup * p.steps
    rel = jnp.clip((step - start) / jnp.maximum(p.steps - start, 1.0), 0.0, 1.0)
    return p.beta_end + (p.beta_start - p.beta_end) * (1.0 - rel)


def adaround(w: jax.Array, wg_shape: tuple[int, int, int], qp: QParams, mom: Moments, p: AdaRoundParams) -> AdaRoundResult:
    """Learned codes for weight `w` (`[out, …]`, per-channel `qp` on axis 0)."""
    w = jnp.asarray(w, jnp.float32)
    inv = _broadcastable(jnp.float32(1.0) / qp.scale, qp, w.ndim)
    off = _broadcastable(qp.offset.astype(jnp.float32), qp, w.ndim)
    scale = _broadcastable(qp.scale, qp, w.ndim)
    x = w * inv
    base = jnp.floor(x)
    rest = jnp.clip(x - base, 1e-4, 1 - 1e-4)
    v0 = -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
    qmin, qmax = qp.scheme.qmin, qp.scheme.qmax

    def weight_of(h):
        return (jnp.clip(base + off + h, qmin, qmax) - off) * scale

    wg = jnp.reshape(w, wg_shape)

    def loss(v, step):
        h = rectified_sigmoid(v)
        recon = output_error(jnp.reshape(weight_of(h), wg_shape), wg, mom)
        reg = jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** _beta(step, p))
        return recon + jnp.where(step >= p.warmup * p.steps, p.reg, 0.0) * reg

    opt = optax.adam(p.learning_rate)

    def step_fn(carry, step):
        v, state = carry
        grads = jax.grad(loss)(v, step.astype(jnp.float32))
        updates, state = opt.update(grads, state, v)
        return (optax.apply_updates(v, updates), state), None

    (v, _), _ = lax.scan(step_fn, (v0, opt.init(v0)), jnp.arange(p.steps))
    hard = (rectified_sigmoid(v) >= 0.5).astype(jnp.float32)
    q = jnp.clip(base + off + hard, qmin, qmax)
    w_rtn = fake_quant(w, qp)
    return AdaRoundResult(
        q.astype(jnp.int32),
        output_error(jnp.reshape(w_rtn, wg_shape), wg, mom),
        output_error(jnp.reshape(weight_of(hard), wg_shape), wg, mom),
    )


@functools.partial(jax.jit, static_argnames=("wg_shape", "params"))
def adaround_bucket(ws, wg_shape, qps, moms, params: AdaRoundParams) -> AdaRoundResult:
    """`adaround` over a stacked bucket of equal-shaped layers."""
    return jax.vmap(lambda w, qp, mom: adaround(w, wg_shape, qp, mom, params))(ws, qps, moms)
