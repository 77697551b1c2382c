import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq import sweep


def _state(x, bins=256):
    obs = jaxq.histogram_observer(bins, 256)
    buf = np.full(1 << 15, x[0], np.float32)
    buf[: x.size] = x
    return jaxq.update_observer(obs.init(), jnp.asarray(buf), jnp.int32(x.size), obs)


def test_sigma_sweep_matches_the_sigma_rule():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    st = _state(x)
    res = sweep.sweep_sigma(st, np.float32([0.0, 0.5, 1.0, 100.0]))
    assert (float(res.lo[0]), float(res.hi[0])) == (x.min(), x.max())
    np.testing.assert_allclose(float(res.hi[1]), 0.8 * 0.5 * x.std(), rtol=0.02)  # moments from bin centres
    assert float(res.hi[3]) == x.max()  # never wider than observed
    assert float(res.error[1]) > float(res.error[2])  # σ = 0.5 clips far too much


def test_coarsen_keeps_mass():
    h = jnp.arange(16.0)
    c = sweep.coarsen(h, 4)
    np.testing.assert_array_equal(np.asarray(c[:4]), [6, 22, 38, 54])
    assert float(c.sum()) == float(h.sum()) and float(c[4:].sum()) == 0


def test_bin_sweep_and_methods():
    x = np.maximum(np.random.default_rng(1).standard_normal(20000), 0).astype(np.float32)
    st = _state(x, bins=512)
    res = sweep.sweep_bins(st, np.int32([1, 2, 8]))
    assert np.all(np.asarray(res.lo) <= 0.0 + 1e-6) and np.all(np.asarray(res.hi) <= x.max() + 1e-6)
    m = sweep.compare_methods(st, 3.0)
    assert float(m["l2"].error) <= float(m["minmax"].error)
    assert float(m["l2"].error) <= float(res.error.min()) * (1 + 1e-5)
