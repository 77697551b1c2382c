"""GPTQ (Frantar et al., ICLR 2023): the codes of a weight chosen column by column, each
column's rounding error fed back into the columns not yet quantized.

For a weight `W [o, d]` whose input rows `x` have second moment `H = E[xxᵀ]` `[d, d]`, the
layer-output error `E‖(Ŵ − W)x‖² = tr((Ŵ − W) H (Ŵ − W)ᵀ)`. Quantizing column `j` to
`q_j = clamp(round(w_j / s) + o)` and moving its error `e = (w_j − (q_j − o)·s) / U_jj`
onto the later columns, `W[:, j+1:] −= e · U[j, j+1:]`, with `U` the upper Cholesky factor
of `H⁻¹` (`H⁻¹ = UᵀU`), is the optimal (OBS) update for the columns that remain. Columns
are processed `block_size` at a time: inside a block the update touches only the block,
and the block's errors reach the later columns in one matrix product (lazy batch update).

`damp·mean(diag H)` is added to the diagonal (`H` from few rows is singular); a column no
row ever excites (`H_jj = 0`) is zero and its code is the code of 0. With `act_order`
the columns go in order of decreasing `H_jj`. Scales and offsets are given per column
(`[o, d]`: per channel, or per group of columns), so every ordering keeps them: GPTQ
chooses codes, the quantizer is the caller's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq.padding import bucket_size, power_of_two


class GptqParams(NamedTuple):
    """`jaxq.keep_acc.Gptq` as static arguments: columns per block, damping, act-order."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True


def inverse_hessian_factor(h: jax.Array, damp: float) -> jax.Array:
    """`U` upper triangular with `(H + λI)⁻¹ = UᵀU`, `λ = damp·mean(diag H)`."""
    d = h.shape[0]
    lam = damp * jnp.mean(jnp.diag(h))
    low = jnp.linalg.cholesky(h + lam * jnp.eye(d, dtype=h.dtype))
    eye = jnp.eye(d, dtype=h.dtype)
    inv_low = jax.scipy.linalg.solve_triangular(low, eye, lower=True)  # L⁻¹
    h_inv = inv_low.T @ inv_low
    return jnp.linalg.cholesky(h_inv).T


def _round(w, s, o, qmin: int, qmax: int):
    return jnp.clip(jnp.round(w * (jnp.float32(1.0) / s)) + o, qmin, qmax)


def gptq_codes(
    w: jax.Array,
    h: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    qmin: int,
    qmax: int,
    params: GptqParams = GptqParams(),
) -> jax.Array:
    """Codes `[o, d]` (int32) of `w [o, d]` under per-column `scale`, `offset` `[o, d]`,
    for inputs of second moment `h [d, d]` (module docstring)."""
    o, d = w.shape
    w, h = w.astype(jnp.float32), h.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[None, :], 0.0, w)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if params.act_order else jnp.arange(d)
    w, s, off = w[:, perm], scale[:, perm].astype(jnp.float32), offset[:, perm].astype(jnp.float32)
    u = inverse_hessian_factor(h[perm][:, perm], params.damp)
    b = min(params.block_size, d)
    pad = -d % b
    dp = d + pad
    w = jnp.pad(w, ((0, 0), (0, pad)))
    s = jnp.pad(s, ((0, 0), (0, pad)), constant_values=1.0)
    off = jnp.pad(off, ((0, 0), (0, pad)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.pad(jnp.zeros(d, u.dtype), (0, pad), constant_values=1.0))
    cols = jnp.arange(b)

    def one_block(k, carry):
        w, q = carry
        i1 = k * b
        w1 = lax.dynamic_slice(w, (0, i1), (o, b))
        s1, o1 = lax.dynamic_slice(s, (0, i1), (o, b)), lax.dynamic_slice(off, (0, i1), (o, b))
        u1 = lax.dynamic_slice(u, (i1, i1), (b, b))

        def one_column(i, c):
            w1, q1, e1 = c
            wc, sc, oc = w1[:, i], s1[:, i], o1[:, i]
            qc = _round(wc, sc, oc, qmin, qmax)
            e = (wc - (qc - oc) * sc) / u1[i, i]
            w1 = w1 - e[:, None] * jnp.where(cols > i, u1[i], 0.0)[None, :]
            return w1, q1.at[:, i].set(qc), e1.at[:, i].set(e)

        zeros = jnp.zeros((o, b), jnp.float32)
        _, q1, e1 = lax.fori_loop(0, b, one_column, (w1, zeros, zeros))
        later = jnp.arange(dp) >= i1 + b
        w = w - jnp.where(later[None, :], e1 @ lax.dynamic_slice(u, (i1, 0), (b, dp)), 0.0)
        return w, lax.dynamic_update_slice(q, q1, (0, i1))

    _, q = lax.fori_loop(0, dp // b, one_block, (w, jnp.zeros((o, dp), jnp.float32)))
    q = q[:, :d]
    return jnp.zeros_like(q).at[:, perm].set(q).astype(jnp.int32)


class Problem(NamedTuple):
    """One GPTQ problem on the host: weight `[o, d]`, second moment `[d, d]`, scale and
    offset per row `[o]` or per column `[o, d]` (groups: `jaxq.groupwise.per_column`), the
    codes it starts from `[o, d]` (the error before)."""

    w: np.ndarray
    h: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    start: np.ndarray


def _padded(p: Problem, o: int, d: int) -> Problem:
    """`p` zero-padded to `[o, d]`: padded rows are zero weights on scale 1; padded columns
    are zero weights whose `H_jj` is the mean of the real diagonal (dead columns counted as
    1, as `gptq_codes` does), so the damping and every real column's result are unchanged."""
    po, pd = o - p.w.shape[0], d - p.w.shape[1]
    scale, offset = (np.broadcast_to(np.reshape(v, (len(v), -1)), p.w.shape) for v in (p.scale, p.offset))
    diag = np.diag(p.h).copy()
    diag[diag == 0] = 1.0
    h = np.pad(p.h, ((0, pd), (0, pd)))
    h[np.arange(p.w.shape[1], d), np.arange(p.w.shape[1], d)] = diag.mean()
    return Problem(
        np.pad(p.w, ((0, po), (0, pd))),
        h,
        np.pad(scale, ((0, po), (0, pd)), constant_values=1.0),
        np.pad(offset, ((0, po), (0, pd))),
        np.pad(p.start, ((0, po), (0, pd))),
    )


def _error(w, q, h, s, z):
    delta = (q.astype(jnp.float32) - z) * s - w
    return jnp.einsum("od,de,oe->", delta, h, delta, precision=lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "params"))
def _solve_bucket(stacked: Problem, qmin: int, qmax: int, params: GptqParams):
    def one(p: Problem):
        codes = gptq_codes(p.w, p.h, p.scale, p.offset, qmin, qmax, params)
        return codes, _error(p.w, p.start, p.h, p.scale, p.offset), _error(p.w, codes, p.h, p.scale, p.offset)

    return jax.vmap(one)(stacked)


def solve_problems(problems: dict, qmin: int, qmax: int, params: GptqParams, done=None) -> dict:
    """`{key: (codes [o, d], error before, error after)}` of many problems, one compiled
    program per size bucket (`jaxq.padding.bucket_size` on both axes, problem count padded to a power of
    two), so a model's layers need a handful of programs. `done(keys)` after each bucket."""
    buckets: dict = {}
    for key, p in problems.items():
        buckets.setdefault((bucket_size(p.w.shape[0]), bucket_size(p.w.shape[1])), []).append(key)
    out = {}
    for (o, d), keys in buckets.items():
        padded = [_padded(problems[k], o, d) for k in keys]
        count = power_of_two(len(padded))
        padded += [padded[-1]] * (count - len(padded))
        stacked = Problem(*(np.stack([np.asarray(getattr(p, f), np.float32) for p in padded]) for f in Problem._fields))
        codes, before, after = jax.tree.map(np.asarray, _solve_bucket(stacked, qmin, qmax, params))
        for i, k in enumerate(keys):
            o_k, d_k = problems[k].w.shape
            out[k] = (codes[i, :o_k, :d_k], float(before[i]), float(after[i]))
        if done is not None:
            done(keys)
    return out
