import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
from jaxq.histogram import batch_histogram, grid_error, l2_optimal_bins, modelled_error, rebin


def model_errors(hist: jax.Array, levels: int) -> jax.Array:
    """Test oracle: `[B, B]` modelled L2 error (bin units) of every candidate `(s, e)`; `inf` where `e < s`."""
    idx = jnp.arange(hist.shape[0])
    return modelled_error(hist, levels)(idx[:, None], idx[None, :])


def _padded(x: np.ndarray, size: int = 1 << 14):
    buf = np.full(size, x.reshape(-1)[0], np.float32)
    buf[: x.size] = x.reshape(-1)
    return jnp.asarray(buf), jnp.int32(x.size)


def _grid_error_brute(hist, s, e, levels, samples=4000):
    step = (e - s + 1) / (levels - 1)
    t = np.arange(len(hist))[:, None] + (np.arange(samples)[None, :] + 0.5) / samples - s
    q = np.clip(np.round(t / step), 0, levels - 1) * step
    return float((hist[:, None] * (t - q) ** 2).mean(1).sum())


def test_batch_histogram_matches_numpy_and_ignores_padding():
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    buf, n = _padded(x)
    ours = np.asarray(batch_histogram(buf, n, jnp.float32(x.min()), jnp.float32(x.max()), 64))
    ref, _ = np.histogram(x, bins=64, range=(x.min(), x.max()))
    assert ours.sum() == 5000
    assert np.abs(ours - ref).sum() <= 4  # edge rounding of a few values only


@pytest.mark.parametrize("phase", [0, 1, 3])
def test_sampled_histogram_weights_rows_back_to_the_full_count(phase):
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal(60_000)).astype(np.float32)
    buf, n = _padded(x, 1 << 16)  # 64 rows of 1024, 59 of them (partly) valid
    lo, hi = jnp.float32(0.0), jnp.float32(x.max())
    full = np.asarray(batch_histogram(buf, n, lo, hi, 32))
    sampled = np.asarray(batch_histogram(buf, n, lo, hi, 32, max_rows=16, phase=phase))  # stride 4
    rows = np.arange(64)[phase % 4 :: 4]
    kept = np.concatenate([x[r * 1024 : (r + 1) * 1024] for r in rows])
    ref, _ = np.histogram(kept, bins=32, range=(0.0, float(x.max())))
    assert np.abs(sampled - 4 * ref).sum() <= 4 * 4  # exactly the rows r ≡ phase (mod 4), weighted 4
    np.testing.assert_allclose(sampled.sum(), full.sum(), rtol=0.05)  # 15 of 59 valid rows, ×4
    assert np.abs(sampled - full).sum() / full.sum() < 0.05


def test_sampled_observer_keeps_the_exact_extremes():
    x = np.zeros(1 << 16, np.float32)
    x[5] = -3.0  # row 0
    x[40_000] = 7.0  # row 39: not a row a stride-4 sample at phase 0 bins
    obs = jaxq.histogram_observer(64, 256, max_rows=16)
    state = jaxq.update_observer(obs.init(), jnp.asarray(x), jnp.int32(x.size), obs)
    assert float(state.lo) == -3.0 and float(state.hi) == 7.0
    assert float(state.hist.sum()) == x.size


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0, 100, allow_nan=False, allow_subnormal=False, width=32), min_size=8, max_size=8),
    st.floats(-5, 5, allow_subnormal=False, width=32),
    st.floats(0.1, 5),
    st.floats(0, 5, allow_subnormal=False, width=32),
    st.floats(0, 5, allow_subnormal=False, width=32),
)
def test_rebin_conserves_mass(counts, lo, width, grow_lo, grow_hi):
    hist = jnp.asarray(np.array(counts, np.float32))
    new = rebin(
        hist, jnp.float32(lo), jnp.float32(lo + width), jnp.float32(lo - grow_lo), jnp.float32(lo + width + grow_hi)
    )
    np.testing.assert_allclose(float(new.sum()), float(hist.sum()), rtol=1e-4, atol=1e-3)
    assert float(new.min()) >= -1e-3


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0, 100, allow_nan=False, allow_subnormal=False, width=32), min_size=16, max_size=16),
    st.floats(-5, 5, allow_subnormal=False, width=32),
    st.floats(0.1, 5),
    st.floats(0, 5, allow_subnormal=False, width=32),
    st.floats(0, 5, allow_subnormal=False, width=32),
)
def test_rebin_interpolates_the_cumulative_distribution(counts, lo, width, grow_lo, grow_hi):
    hist = np.array(counts, np.float32)
    hi, new_lo, new_hi = lo + width, lo - grow_lo, lo + width + grow_hi
    new = rebin(jnp.asarray(hist), *map(jnp.float32, (lo, hi, new_lo, new_hi)))
    k = np.arange(17, dtype=np.float64)
    want = np.diff(np.interp(new_lo + (new_hi - new_lo) * k / 16, lo + (hi - lo) * k / 16, np.r_[0.0, np.cumsum(hist)]))
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-4, atol=1e-3 * max(1.0, hist.sum()))


def test_rebin_degenerate_range_keeps_mass_in_one_bin():
    hist = jnp.zeros(8).at[0].set(10.0)
    new = rebin(hist, jnp.float32(2.0), jnp.float32(2.0), jnp.float32(0.0), jnp.float32(8.0))
    assert float(new[2]) == 10.0 and float(new.sum()) == 10.0


def test_growing_ranges_lose_no_mass():
    obs = jaxq.histogram_observer(256, 256)
    rng = np.random.default_rng(1)
    state = obs.init()
    total = 0
    for scale in (0.1, 1.0, 10.0, 3.0):
        x = (rng.standard_normal(3000) * scale).astype(np.float32)
        total += x.size
        state = jaxq.update_observer(state, *_padded(x), obs)
    np.testing.assert_allclose(float(state.hist.sum()), total, rtol=1e-5)


@pytest.mark.parametrize("s, e, levels", [(0, 63, 8), (5, 40, 4), (10, 12, 16), (0, 30, 256), (20, 63, 3)])
def test_grid_error_closed_form(s, e, levels):
    hist = np.random.default_rng(s).random(64).astype(np.float32)
    hist[0] = 20.0  # a spike, as ReLU zeros make
    ours = float(grid_error(jnp.asarray(hist), jnp.int32(s), jnp.int32(e), levels))
    np.testing.assert_allclose(ours, _grid_error_brute(hist, s, e, levels), rtol=1e-4)


def test_model_is_exact_for_clipping_and_close_inside():
    hist = np.random.default_rng(3).random(128).astype(np.float32)
    model = np.asarray(model_errors(jnp.asarray(hist), 16))
    for s, e in [(0, 127), (10, 100), (40, 90)]:
        exact = float(grid_error(jnp.asarray(hist), jnp.int32(s), jnp.int32(e), 16))
        np.testing.assert_allclose(model[s, e], exact, rtol=0.05)
    assert np.isinf(model[5, 4])


@pytest.mark.parametrize("kind", ["normal", "relu", "heavy", "bimodal", "spiky"])
def test_search_finds_the_exhaustive_optimum_on_small_histograms(kind):
    rng = np.random.default_rng(7)
    bins, levels = 96, 8
    x = {
        "normal": rng.standard_normal(20000),
        "relu": np.maximum(rng.standard_normal(20000), 0),
        "heavy": rng.standard_t(2, 20000),
        "bimodal": np.concatenate([rng.standard_normal(10000) * 0.2 - 3, rng.standard_normal(10000) * 0.2 + 5]),
        "spiky": np.concatenate([np.zeros(15000), rng.exponential(1, 5000)]),
    }[kind]
    hist, _ = np.histogram(x, bins=bins)
    hist = jnp.asarray(hist.astype(np.float32))
    s, e, err = jax.jit(lambda h: l2_optimal_bins(h, levels))(hist)
    pairs = np.array(list(itertools.combinations_with_replacement(range(bins), 2)), np.int32)
    every = jax.jit(jax.vmap(lambda a, b: grid_error(hist, a, b, levels)))(pairs[:, 0], pairs[:, 1])
    best = float(every.min())
    assert float(err) <= best * (1 + 1e-4), (int(s), int(e), float(err), best)


def test_histogram_observer_finalize_in_bucket():
    obs = jaxq.histogram_observer(512, 256)
    rng = np.random.default_rng(0)
    states = {}
    for i in range(3):
        s = obs.init()
        for _ in range(2):
            s = jaxq.update_observer(s, *_padded(np.maximum(rng.standard_normal(4000), 0).astype(np.float32)), obs)
        states[f"l{i}"] = s
    out = jaxq.finalize_activations(states, obs, jaxq.QScheme(8, False, False))
    for r in out.values():
        assert 0.0 <= float(r.lo) < float(r.hi)
        assert int(r.first_bad) == -1
