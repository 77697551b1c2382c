"""SmoothQuant factors and the α search (`jaxq.smoothing`)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
from jaxq.smoothing import ChannelRange, search_alpha, smoothed_error, smoothing_factors, weight_column_absmax

W8 = jaxq.QScheme(bits=8, signed=True, symmetric=True, axis=0)
A8 = jaxq.QScheme(bits=8, signed=False, symmetric=False, axis=None)


def _layer(seed: int, n=256, d=32, out=16, outlier=40.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 3] *= outlier  # one outlier channel, as in transformer activations
    w = rng.normal(size=(out, d)).astype(np.float32) * 0.1
    return x, w, ChannelRange(jnp.asarray(x.min(0)), jnp.asarray(x.max(0)))


def test_factors_follow_the_formula_and_leave_dead_channels_alone():
    a = np.array([4.0, 1.0, 0.0, 9.0], np.float32)
    w = np.array([1.0, 4.0, 2.0, 0.0], np.float32)
    s = np.asarray(smoothing_factors(a, w, 0.5))
    np.testing.assert_allclose(s[:2], [4.0**0.5 / 1.0**0.5, 1.0 / 4.0**0.5], rtol=1e-6)
    np.testing.assert_array_equal(s[2:], [1.0, 1.0])
    np.testing.assert_allclose(np.asarray(smoothing_factors(a, w, 1.0))[:2], a[:2], rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_smoothing_leaves_the_float_product_unchanged(seed, alpha):
    """`(x / s)·(W·diag(s))ᵀ = x·Wᵀ` for every α (module doc)."""
    x, w, r = _layer(seed % 1000, n=16)
    a_max = np.maximum(np.abs(x.min(0)), np.abs(x.max(0)))
    s = np.asarray(smoothing_factors(a_max, np.asarray(weight_column_absmax(w)), alpha))
    assert np.all(s > 0) and np.all(np.isfinite(s))
    np.testing.assert_allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_search_compares_with_no_smoothing_and_picks_the_least_error():
    x, w, r = _layer(0)
    alphas = np.array([0.25, 0.5, 0.75], np.float32)
    s, errors = search_alpha(jnp.asarray(x), r, jnp.asarray(w), alphas, W8, A8)
    errors = np.asarray(errors)
    assert errors.shape == (4,)
    np.testing.assert_allclose(
        errors[0], float(smoothed_error(jnp.asarray(x), r, jnp.asarray(w), jnp.ones(32), W8, A8)), rtol=1e-6
    )
    best = int(np.argmin(errors))
    assert best > 0 and errors[best] < 0.5 * errors[0]  # the outlier channel makes smoothing pay
    a_max = np.maximum(np.abs(x.min(0)), np.abs(x.max(0)))
    np.testing.assert_allclose(
        np.asarray(s), np.asarray(smoothing_factors(a_max, np.abs(w).max(0), alphas[best - 1])), rtol=1e-6
    )


def test_search_keeps_no_smoothing_when_nothing_is_gained():
    """Channels of equal range: no α beats leaving the layer alone by much; the
    candidate `s = 1` is always in the running."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(256, 32)).astype(np.float32)
    w = rng.uniform(-1, 1, size=(16, 32)).astype(np.float32)
    r = ChannelRange(jnp.asarray(x.min(0)), jnp.asarray(x.max(0)))
    _, errors = search_alpha(jnp.asarray(x), r, jnp.asarray(w), np.array([0.5], np.float32), W8, A8)
    assert np.asarray(errors)[0] <= np.asarray(errors)[1] * 1.5


def test_a_second_search_of_the_same_shapes_compiles_nothing():
    x, w, r = _layer(2)
    alphas = np.array([0.4, 0.6], np.float32)
    search_alpha(jnp.asarray(x), r, jnp.asarray(w), alphas, W8, A8)
    x2, w2, r2 = _layer(3)
    with jaxq.compile_count() as compiles:
        search_alpha(jnp.asarray(x2), r2, jnp.asarray(w2), alphas, W8, A8)
    assert compiles.count == 0


@pytest.mark.parametrize(
    "value, expected",
    [(None, ()), (False, ()), ([], ()), (0.5, (0.5,)), ([0.2, 0.8], (0.2, 0.8)), (True, jaxq.config.SMOOTH_ALPHAS)],
)
def test_config_normalises_smooth_quant(value, expected):
    assert jaxq.QuantConfig(smooth_quant=value).smooth_quant == expected


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), "0.5", [0.5, 2.0]])
def test_config_refuses_bad_alpha(value):
    with pytest.raises(ValueError, match="smooth_quant"):
        jaxq.QuantConfig(smooth_quant=value)


def test_config_refuses_smoothing_without_quantized_activations():
    with pytest.raises(ValueError, match="act_quant=True"):
        jaxq.QuantConfig(smooth_quant=0.5, act_quant=False)
