import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxq import QParams, QScheme, dequantize, fake_quant, qparams_from_range, quantize
from jaxq.qparams import EPS

schemes = st.builds(QScheme, bits=st.sampled_from([2, 3, 4, 6, 8, 16]), signed=st.booleans(), symmetric=st.booleans())
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(scheme=schemes, lo=finite, hi=finite)
def test_range_maps_onto_grid(scheme, lo, hi):
    lo, hi = min(lo, hi), max(lo, hi)
    qp = qparams_from_range(lo, hi, scheme)
    s, o = float(qp.scale), int(qp.offset)
    assert np.isfinite(s) and s >= EPS
    assert scheme.qmin <= o <= scheme.qmax
    if scheme.symmetric:
        assert o == 0
    else:  # zero is exactly representable and the range fits the grid
        assert float(fake_quant(jnp.float32(0.0), qp)) == 0.0
        assert s * (scheme.qmax - scheme.qmin) >= (max(hi, 0) - min(lo, 0)) * (1 - 1e-5)


@settings(max_examples=200, deadline=None)
@given(scheme=schemes, lo=finite, hi=finite, data=st.data())
def test_error_within_half_step_inside_range(scheme, lo, hi, data):
    lo, hi = min(lo, hi), max(lo, hi)
    qp = qparams_from_range(lo, hi, scheme)
    s, o = float(qp.scale), int(qp.offset)
    rep_lo, rep_hi = (scheme.qmin - o) * s, (scheme.qmax - o) * s
    x = np.float32(data.draw(st.floats(rep_lo, rep_hi, allow_nan=False)))
    err = abs(float(fake_quant(jnp.float32(x), qp)) - float(x))
    assert err <= 0.5 * s * (1 + 1e-4) + 1e-6 * abs(float(x))


@settings(max_examples=100, deadline=None)
@given(scheme=schemes, lo=finite, hi=finite)
def test_fake_quant_is_idempotent_and_on_grid(scheme, lo, hi):
    qp = qparams_from_range(min(lo, hi), max(lo, hi), scheme)
    x = jnp.linspace(min(lo, hi) * 1.5 - 1, max(lo, hi) * 1.5 + 1, 257, dtype=jnp.float32)
    q = quantize(x, qp)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    once = fake_quant(x, qp)
    np.testing.assert_array_equal(np.asarray(fake_quant(once, qp)), np.asarray(once))
    np.testing.assert_array_equal(np.asarray(dequantize(q, qp)), np.asarray(once))


def test_ties_round_half_to_even():
    qp = QParams(jnp.float32(1.0), jnp.int32(0), QScheme(8, True, True))
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5, 127.5, -128.5, 300.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(quantize(x, qp)), [0, 2, 2, 0, -2, 127, -128, 127])


def test_all_zero_channel_gives_finite_quantizer():
    w = jnp.zeros((3, 4), jnp.float32).at[1].set(jnp.arange(4.0))
    for sym in (True, False):
        scheme = QScheme(8, True, sym, axis=0)
        qp = qparams_from_range(w.min(axis=1), w.max(axis=1), scheme)
        assert np.all(np.isfinite(np.asarray(fake_quant(w, qp))))
        np.testing.assert_array_equal(np.asarray(fake_quant(w, qp))[0], 0.0)


def test_unsigned_uses_full_range():
    qp = qparams_from_range(0.0, 255.0, QScheme(8, signed=False, symmetric=False))
    assert float(qp.scale) == 1.0 and int(qp.offset) == 0
    assert int(quantize(jnp.float32(200.0), qp)) == 200  # msModelSlim would clip to 127


def test_per_channel_broadcasts_along_axis_and_jits():
    w = jnp.array([[1.0, -2.0], [10.0, 5.0]])
    scheme = QScheme(8, True, True, axis=0)
    qp = qparams_from_range(w.min(axis=1), w.max(axis=1), scheme)
    np.testing.assert_allclose(np.asarray(qp.scale), [2 / 127, 10 / 127], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax.jit(quantize)(w, qp)), [[64, -127], [127, 64]])
