import pytest
import numpy as np
import jax.numpy as jnp
from hypothesis import given, settings, strategies as st

import jaxq
from jaxq import QScheme
from jaxq.squant import real_codes, squant_round


def numpy_flip(q, x, qmin, qmax):
    """Loop reference of one SQuant pass over the rows of 2-D arrays."""
    q = q.copy()
    for r in range(q.shape[0]):
        delta = q[r] - x[r]
        n = int(np.round(delta.sum()))
        if n > 0:
            cand = sorted(range(q.shape[1]), key=lambda i: (q[r, i] <= qmin, -delta[i], i))
            for i in cand[:n]:
                q[r, i] -= 1
        elif n < 0:
            cand = sorted(range(q.shape[1]), key=lambda i: (q[r, i] >= qmax, delta[i], i))
            for i in cand[:-n]:
                q[r, i] += 1
    return q


def numpy_squant(w, scale, offset, qmin, qmax):
    shape = (-1,) + (1,) * (w.ndim - 1)
    x = np.clip(w * (np.float32(1) / scale).reshape(shape) + offset.reshape(shape), qmin, qmax)
    q = np.clip(np.round(w * (np.float32(1) / scale).reshape(shape)) + offset.reshape(shape), qmin, qmax)
    k = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
    if k > 1:
        q = numpy_flip(q.reshape(-1, k), x.reshape(-1, k), qmin, qmax).reshape(w.shape)
    q = numpy_flip(q.reshape(w.shape[0], -1), x.reshape(w.shape[0], -1), qmin, qmax).reshape(w.shape)
    return np.clip(q, qmin, qmax)


def _quantized(w, scheme):
    return jaxq.quantize_weight(jnp.asarray(w), scheme)


@pytest.mark.slow
def test_matches_numpy_reference_conv_and_linear():
    rng = np.random.default_rng(0)
    for shape in [(6, 4, 3, 3), (5, 17), (8, 1, 3, 3)]:
        w = rng.standard_normal(shape).astype(np.float32)
        for scheme in (QScheme(4, True, True, 0), QScheme(3, True, False, 0)):
            qp = _quantized(w, scheme).qparams
            ref = numpy_squant(w, np.asarray(qp.scale), np.asarray(qp.offset), scheme.qmin, scheme.qmax)
            np.testing.assert_array_equal(np.asarray(squant_round(jnp.asarray(w), qp)), ref)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 4, 6, 8]),
    symmetric=st.booleans(),
    kernel=st.sampled_from([1, 3]),
)
def test_channel_error_sums_within_half_and_values_move_less_than_one(seed, bits, symmetric, kernel):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((6, 5, kernel, kernel)).astype(np.float32))
    scheme = QScheme(bits, True, symmetric, 0)
    qp = _quantized(w, scheme).qparams
    q = np.asarray(squant_round(w, qp)).astype(np.float64)
    x = np.asarray(real_codes(w, qp)).astype(np.float64)
    assert np.all(np.abs(q - x) < 1.0 + 1e-5)
    assert np.all(np.abs((q - x).reshape(6, -1).sum(axis=1)) <= 0.5 + 1e-4)
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax


def test_reduces_channel_error_sums_and_keeps_weight_error_close():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((32, 16, 3, 3)).astype(np.float32))
    qw = _quantized(w, QScheme(4, True, True, 0))
    x = np.asarray(real_codes(w, qw.qparams))
    rtn, sq = np.asarray(qw.q), np.asarray(squant_round(w, qw.qparams))
    assert np.abs((sq - x).reshape(32, -1).sum(1)).max() <= 0.5 + 1e-4 < np.abs((rtn - x).reshape(32, -1).sum(1)).max()
    assert np.sum((sq - x) ** 2) < 1.5 * np.sum((rtn - x) ** 2)
