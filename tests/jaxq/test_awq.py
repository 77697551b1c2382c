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


def test_clip_search_never_loses_to_min_max_per_group():
    from jaxq.awq import _group_error, search_clip

    rng = np.random.default_rng(2)
    w = rng.standard_t(2, size=(24, 64)).astype(np.float32)  # heavy tails: clipping pays
    x = rng.normal(size=(256, 64)).astype(np.float32)
    qp = search_clip(w, x, SCHEME, 32, grid=10)
    assert qp.scale.shape == (24, 2)
    wg, xg = w.reshape(24, 2, 32), x.reshape(256, 2, 32)
    lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
    plain = np.asarray(_group_error(wg, xg, lo, hi, 1.0, SCHEME))
    r = np.asarray(qp.scale) / np.maximum(np.abs(lo), np.abs(hi)) * SCHEME.qmax
    chosen = np.asarray(_group_error(wg, xg, lo * r, hi * r, 1.0, SCHEME))
    assert (chosen <= plain * (1 + 1e-5)).all() and (chosen < plain).mean() > 0.3
