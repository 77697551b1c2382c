"""Per-layer sensitivity metrics, streamed over batches from captured layer outputs.

For the float output `f` and quantized output `q` of a layer, one pass accumulates

    ErrorStats = (Σ(q − f)², Σf, Σf², Σf·q, Σq², n)

from zero-padded flat buffers (zeros add nothing to any sum), and `finalize_metrics`
turns a stacked bucket of them into

    mse          = Σ(q − f)² / n                     (msModelSlim's AMP ranking)
    relative_mse = mse / Var(f)                      (scale-free: large layers don't dominate)
    cosine       = Σf·q / √(Σf² · Σq²)

Model-output distances for isolated sensitivity are per sample
(`jaxq.model_metrics.sample_distances`: KL for logits, `1 − cos` otherwise).

Their second-order (Fisher) estimate: near the float output `f`, a distance `D` with
`D(f) = 0` and `∇D(f) = 0` is `D(f + Δz) ≈ ½·Δzᵀ H Δz`. A random cotangent `c` with
`Cov(c) = H` gives `E[(c·Δz)²] = Δzᵀ H Δz`, so one backward pass of `c` through the model
scores every layer's output change `Δz` at once (`kl_cotangent`, `cosine_cotangent`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ErrorStats(NamedTuple):
    sq_err: jax.Array
    sum_f: jax.Array
    sum_f2: jax.Array
    dot: jax.Array
    sum_q2: jax.Array
    n: jax.Array


def init_stats() -> ErrorStats:
    z = jnp.float32(0.0)
    return ErrorStats(z, z, z, z, z, z)


@jax.jit
def update_stats(stats: ErrorStats, f: jax.Array, q: jax.Array, n_valid) -> ErrorStats:
    """Add one batch: `f`, `q` are zero-padded flat buffers of equal length."""
    rows_f, rows_q = f.reshape(-1, 1024), q.reshape(-1, 1024)
    d = rows_q - rows_f
    sums = jax.lax.reduce(
        (d * d, rows_f, rows_f * rows_f, rows_f * rows_q, rows_q * rows_q),
        (jnp.float32(0.0),) * 5,
        lambda a, b: tuple(u + v for u, v in zip(a, b)),
        (0, 1),
    )
    return ErrorStats(*(s + t for s, t in zip(stats[:5], sums)), stats.n + n_valid)


@jax.jit
def finalize_metrics(stats: ErrorStats) -> dict[str, jax.Array]:
    """`mse`, `relative_mse`, `cosine` of (stacked) stats."""
    n = jnp.maximum(stats.n, 1.0)
    mse = stats.sq_err / n
    var = jnp.maximum(stats.sum_f2 / n - (stats.sum_f / n) ** 2, jnp.finfo(jnp.float32).tiny)
    cosine = stats.dot / jnp.sqrt(jnp.maximum(stats.sum_f2 * stats.sum_q2, jnp.finfo(jnp.float32).tiny))
    return {"mse": mse, "relative_mse": mse / var, "cosine": cosine}


@jax.jit
def kl_cotangent(key: jax.Array, logits: jax.Array) -> jax.Array:
    """`c = √p⊙g − p·(√p·g)`, `g ~ N(0, I)`, `p = softmax(logits)` per row: with
    `A = diag(√p) − p√pᵀ`, `Cov(c) = AAᵀ = diag(p) − ppᵀ` (as `Σp = 1`), the Hessian of
    `KL(p ‖ softmax(z))` at `z = logits` (rows independent). Gaussian, `(c·Δz)²` has a
    relative variance of 2 whatever `p`; the categorical draw `onehot(y) − p`, `y ~ p`, with
    the same covariance, has one that grows as `1/p_k` when an unlikely class moves
    (`benchmarks/README.md` compares their rankings)."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    root_p = jnp.sqrt(p)
    g = root_p * jax.random.normal(key, p.shape, jnp.float32)
    return g - p * jnp.sum(g, axis=-1, keepdims=True)


@jax.jit
def cosine_cotangent(key: jax.Array, out: jax.Array) -> jax.Array:
    """Per sample (leading axis, the rest flattened) `c = (I − f̂f̂ᵀ)·r / |f|`, `r ~ N(0, I)`:
    `Cov(c) = (I − f̂f̂ᵀ)/|f|²`, the Hessian of `1 − cos(f, ·)` (as
    `jaxq.model_metrics.cosine_distance_samples`) at `f` = that sample of `out`."""
    f = out.astype(jnp.float32).reshape(out.shape[0], -1)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(f * f, -1, keepdims=True), jnp.finfo(jnp.float32).tiny))
    unit = f / norm
    r = jax.random.normal(key, f.shape, jnp.float32)
    return ((r - unit * jnp.sum(unit * r, -1, keepdims=True)) / norm).reshape(out.shape)


def cotangent_draws(logits: bool) -> int:
    """Cotangents per batch of the Fisher estimate: one for logits (each backward pass is a
    large share of a CNN's ranking; one Gaussian `kl_cotangent` ranks as two categorical
    ones did), two otherwise (`cosine_cotangent`; a transformer's backward pass is cheap)."""
    return 1 if logits else 2


@functools.partial(jax.jit, static_argnames=("draws", "logits"))
def output_cotangents(key: jax.Array, out: jax.Array, draws: int, logits: bool) -> jax.Array:
    """`draws` independent cotangents stacked on a new first axis: `kl_cotangent` for 2-D
    logits (`logits=True`), `cosine_cotangent` otherwise (the distances of `output_distance`)."""
    sample = kl_cotangent if logits else cosine_cotangent
    return jax.vmap(sample, (0, None))(jax.random.split(key, draws), out)
