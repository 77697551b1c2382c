"""GPTQ (`jaxq.gptq`) against a straightforward NumPy port of the paper's algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxq.gptq import GptqParams, gptq_codes, inverse_hessian_factor


def numpy_gptq(w, h, scale, offset, qmin, qmax, block_size, damp, act_order):
    """The reference loop of Frantar et al. (their `fasterquant`), per-column quantizers."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    d = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(d)
    w, h, s, o = w[:, perm], h[perm][:, perm], scale[:, perm].astype(np.float64), offset[:, perm].astype(np.float64)
    h += damp * np.mean(np.diag(h)) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = UᵀU
    q = np.zeros_like(w)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1, e1 = w[:, i1:i2].copy(), np.zeros((w.shape[0], i2 - i1))
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = np.clip(np.round(col / s[:, i1 + i]) + o[:, i1 + i], qmin, qmax)
            err = (col - (qc - o[:, i1 + i]) * s[:, i1 + i]) / u[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(err, u[i1 + i, i1 + i : i2])
            q[:, i1 + i], e1[:, i] = qc, err
        w[:, i2:] -= e1 @ u[i1:i2, i2:]
    out = np.zeros_like(q)
    out[:, perm] = q
    return out.astype(np.int32)


def _problem(seed, o, d, m, groups, asym):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)  # correlated inputs: where GPTQ matters
    x = (rng.normal(size=(m, d)) * rng.uniform(0.2, 3.0, size=d)) @ mix
    x[:, rng.integers(d)] = 0  # a dead column
    h = (x.T @ x / m).astype(np.float32)
    w = rng.normal(size=(o, d)).astype(np.float32)
    size = d // groups
    qmin, qmax = (0, 15) if asym else (-8, 7)
    s, off = np.zeros((o, d), np.float32), np.zeros((o, d), np.float32)
    for k in range(groups):
        part = w[:, k * size : (k + 1) * size] if k < groups - 1 else w[:, k * size :]
        cols = slice(k * size, (k + 1) * size if k < groups - 1 else d)
        if asym:
            lo, hi = np.minimum(part.min(1), 0), np.maximum(part.max(1), 0)
            s[:, cols] = ((hi - lo) / 15)[:, None]
            off[:, cols] = np.round(-lo / ((hi - lo) / 15))[:, None]
        else:
            s[:, cols] = (np.abs(part).max(1) / 7)[:, None]
    return w, h, s, off, qmin, qmax


def _codes(w, h, s, off, qmin, qmax, params=GptqParams()):
    arrays = (jnp.asarray(a) for a in (w, h, s, off))
    return np.asarray(gptq_codes(*arrays, qmin, qmax, params))


@pytest.mark.parametrize("o, d, block, groups", [(4, 16, 16, 1), (8, 24, 8, 3), (5, 37, 16, 1), (3, 64, 128, 4)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("asym", [False, True])
def test_equals_the_numpy_reference(o, d, block, groups, act_order, asym):
    w, h, s, off, qmin, qmax = _problem(d * 7 + o, o, d, 4 * d, groups, asym)
    expected = numpy_gptq(w, h, s, off, qmin, qmax, block, 0.01, act_order)
    got = _codes(w, h, s, off, qmin, qmax, GptqParams(block, 0.01, act_order))
    # float32 against float64: a code may differ where a value sits on a rounding boundary
    assert np.mean(got == expected) >= 0.99, np.argwhere(got != expected)[:5]
    assert got.min() >= qmin and got.max() <= qmax


def _error(w, h, s, off, q):
    delta = (q - off) * s - w
    return float(np.trace(delta @ h @ delta.T))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), act_order=st.booleans(), block=st.sampled_from([4, 8, 32]))
def test_never_much_worse_than_round_to_nearest_and_usually_better(seed, act_order, block):
    w, h, s, off, qmin, qmax = _problem(seed, 6, 32, 96, 1, False)
    rtn = np.clip(np.round(w / s) + off, qmin, qmax)
    q = _codes(w, h, s, off, qmin, qmax, GptqParams(block, 0.01, act_order))
    assert _error(w, h, s, off, q) <= 1.05 * _error(w, h, s, off, rtn)


def test_lowers_the_output_error_on_correlated_inputs():
    w, h, s, off, qmin, qmax = _problem(1, 16, 64, 256, 1, False)
    rtn = np.clip(np.round(w / s) + off, qmin, qmax)
    q = _codes(w, h, s, off, qmin, qmax)
    assert _error(w, h, s, off, q) < 0.8 * _error(w, h, s, off, rtn)


def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_damped_inverse():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 10)).astype(np.float32)
    h = x.T @ x / 50
    u = np.asarray(inverse_hessian_factor(jnp.asarray(h), 0.01))
    assert np.allclose(np.triu(u), u)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(10)
    assert np.allclose(u.T @ u, np.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_vmaps_over_layers_and_compiles_once():
    w, h, s, off, qmin, qmax = _problem(3, 4, 16, 64, 1, False)
    f = jax.jit(jax.vmap(lambda w, h, s, o: gptq_codes(w, h, s, o, qmin, qmax, GptqParams(8, 0.01, True))))
    stack = lambda a: jnp.stack([jnp.asarray(a)] * 3)  # noqa: E731
    out = np.asarray(f(stack(w), stack(h), stack(s), stack(off)))
    assert (out == out[0]).all()
