"""AWQ's scale search (`jaxq.awq`)."""

import jax.numpy as jnp
import numpy as np

from jaxq.awq import candidate_scales, scaled_error, search_scales
from jaxq.scheme import QScheme

SCHEME = QScheme(bits=4, axis=0)


def _outlier_problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, 64)).astype(np.float32)
    x[:, :3] *= 30.0  # a few channels carry large activations, as in language models
    w = rng.normal(size=(48, 64)).astype(np.float32)
    return w, x, np.abs(x).mean(0)


def test_alpha_zero_is_round_to_nearest_and_scales_are_normalised():
    s = np.asarray(candidate_scales(jnp.asarray([1.0, 4.0, 16.0, 0.0]), 4))
    np.testing.assert_array_equal(s[0], 1.0)
    assert s[2, 3] == 1.0  # a channel never active keeps s = 1
    np.testing.assert_allclose(s[2, :3].max() * s[2, :3].min(), 1.0, rtol=1e-5)


def test_search_beats_round_to_nearest_on_outlier_channels():
    w, x, m = _outlier_problem()
    s, errs = search_scales(w, x, m, SCHEME, 32, 20)
    errs = np.asarray(errs)
    assert errs.shape == (20,)
    assert float(np.min(errs)) < 0.8 * float(errs[0])  # α = 0 is plain round to nearest
    np.testing.assert_allclose(float(scaled_error(w, x, s, SCHEME, 32)), errs.min(), rtol=1e-5)


def test_search_never_loses_to_round_to_nearest():
    rng = np.random.default_rng(1)
    w, x = rng.normal(size=(16, 32)).astype(np.float32), rng.normal(size=(64, 32)).astype(np.float32)
    s, errs = search_scales(w, x, np.abs(x).mean(0), SCHEME, None, 8)
    assert float(scaled_error(w, x, s, SCHEME, None)) <= float(np.asarray(errs)[0])
