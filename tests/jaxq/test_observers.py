import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
from jaxq.observers import ROW, sigma_range, sorted_percentile


def _padded(x: np.ndarray, size: int = 4 * ROW):
    buf = np.full(size, x.reshape(-1)[0], np.float32)  # padding contract: repeat a valid entry
    buf[: x.size] = x.reshape(-1)
    return jnp.asarray(buf), jnp.int32(x.size)


def _run(observer, batches):
    state = observer.init()
    for b in batches:
        state = jaxq.update_observer(state, *_padded(b), observer)
    return observer.finalize(state)


batch_lists = st.lists(
    st.lists(st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=50),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(batch_lists)
def test_batch_percentile_matches_numpy(batches):
    batches = [np.array(b, np.float32) for b in batches]
    (lo, hi), bad = _run(jaxq.batch_percentile_minmax(16), batches)
    mins = [b.min() for b in batches]
    maxs = [b.max() for b in batches]
    np.testing.assert_allclose(float(lo), np.percentile(mins, 40), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(hi), np.percentile(maxs, 60), rtol=1e-5, atol=1e-5)
    assert int(bad) == -1


@settings(max_examples=60, deadline=None)
@given(batch_lists)
def test_running_minmax_is_absolute(batches):
    batches = [np.array(b, np.float32) for b in batches]
    (lo, hi), _ = _run(jaxq.running_minmax(), batches)
    assert float(lo) == min(b.min() for b in batches)
    assert float(hi) == max(b.max() for b in batches)


def test_one_batch_percentile_is_plain_minmax():
    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    (lo, hi), _ = _run(jaxq.batch_percentile_minmax(16), [x])
    assert (float(lo), float(hi)) == (x.min(), x.max())


def test_sorted_percentile_linear_interpolation():
    v = jnp.array([1.0, 2.0, 4.0, 8.0, jnp.inf, jnp.inf])
    for q in (0, 40, 60, 100):
        np.testing.assert_allclose(
            float(sorted_percentile(v, jnp.int32(4), q)), np.percentile([1, 2, 4, 8], q), rtol=1e-6
        )


def _sigma_reference(x: np.ndarray, sigma: float):
    lo, hi = x.min(), x.max()
    if sigma == 0:
        return lo, hi
    if lo < 0:
        r = 0.8 * sigma * x.std()
        return max(-r, lo), min(r, hi)
    return lo, min(sigma * x[x > 0].std(), hi)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 3.0, 25.0])
@pytest.mark.parametrize("kind", ["signed", "relu"])
def test_sigma_statistic_matches_reference_over_batches(sigma, kind):
    rng = np.random.default_rng(int(sigma * 10))
    batches = [rng.standard_normal(n).astype(np.float32) * 2 + 0.3 for n in (500, 1200, 3000)]
    if kind == "relu":
        batches = [np.maximum(b, 0) for b in batches]
    (lo, hi), _ = _run(jaxq.sigma_statistic(sigma), batches)
    ref_lo, ref_hi = _sigma_reference(np.concatenate(batches), sigma)
    np.testing.assert_allclose([float(lo), float(hi)], [ref_lo, ref_hi], rtol=1e-4, atol=1e-5)
    allx = np.concatenate(batches)
    assert float(lo) >= allx.min() and float(hi) <= allx.max()  # never wider than observed


@settings(max_examples=100, deadline=None)
@given(
    # XLA on CPU flushes subnormals to zero (lo = -1e-45 came back as -0.0): keep them out
    lo=st.floats(-50, 50, allow_nan=False, allow_subnormal=False, width=32),
    span=st.floats(0, 100, allow_nan=False, allow_subnormal=False, width=32),
    std_all=st.floats(0, 50, allow_nan=False, allow_subnormal=False, width=32),
    std_pos=st.floats(0, 50, allow_nan=False, allow_subnormal=False, width=32),
    sigma=st.floats(0, 30, allow_nan=False, allow_subnormal=False, width=32),
)
def test_sigma_range_never_wider_than_observed(lo, span, std_all, std_pos, sigma):
    hi = lo + span
    rlo, rhi = sigma_range(jnp.float32(lo), jnp.float32(hi), jnp.float32(std_all), jnp.float32(std_pos), sigma)
    assert float(rlo) >= np.float32(lo) and float(rhi) <= np.float32(hi)


@pytest.mark.parametrize(
    "observer", [jaxq.running_minmax(), jaxq.batch_percentile_minmax(16), jaxq.sigma_statistic(25.0)]
)
def test_first_non_finite_batch_is_recorded(observer):
    good = np.ones(100, np.float32)
    bad = good.copy()
    bad[7] = np.nan
    inf = good.copy()
    inf[3] = np.inf
    _, first_bad = _run(observer, [good, good, bad, inf])
    assert int(first_bad) == 2


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3 * ROW - 1), st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 2**31 - 1))
def test_buffer_minmax_is_exact_and_poisoned_by_any_non_finite_value(position, bad, seed):
    x = np.random.default_rng(seed).standard_normal(3 * ROW).astype(np.float32)
    lo, hi = jax.jit(jaxq.observers.buffer_minmax)(jnp.asarray(x))
    assert float(lo) == x.min() and float(hi) == x.max()
    x[position] = bad
    lo, hi = jax.jit(jaxq.observers.buffer_minmax)(jnp.asarray(x))
    assert np.isnan(float(lo)) and np.isnan(float(hi))


def test_update_is_jittable_and_factories_are_cached():
    assert jaxq.batch_percentile_minmax(16) is jaxq.batch_percentile_minmax(16)
    obs = jaxq.sigma_statistic(3.0)
    state = jax.jit(obs.update)(obs.init(), *_padded(np.arange(10, dtype=np.float32)))
    (lo, hi), _ = jax.jit(obs.finalize)(state)
    assert float(lo) == 0.0 and float(hi) <= 9.0


def test_channel_minmax():
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    lo, hi = jaxq.channel_minmax(jnp.asarray(w), axis=0)
    np.testing.assert_array_equal(np.asarray(lo), [-10, 2])
    np.testing.assert_array_equal(np.asarray(hi), [1, 13])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=3000),
    st.floats(-5, 5, allow_subnormal=False, width=32),
)
def test_buffer_moments_ignore_padding(values, offset):
    from jaxq.observers import buffer_moments

    x = np.array(values, np.float32) + np.float32(offset)
    everything, positives = buffer_moments(*_padded(x))
    np.testing.assert_allclose(
        np.asarray(everything),
        [x.size, x.mean(dtype=np.float64), x.var(dtype=np.float64) * x.size],
        rtol=2e-3,
        atol=1e-2 * (1 + np.abs(x).max()),
    )
    pos = x[x > 0]
    ref = [
        pos.size,
        pos.mean(dtype=np.float64) if pos.size else 0.0,
        pos.var(dtype=np.float64) * pos.size if pos.size else 0.0,
    ]
    np.testing.assert_allclose(np.asarray(positives), ref, rtol=2e-3, atol=1e-2 * (1 + np.abs(x).max()))


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([1, 5, ROW - 1, ROW, ROW + 3, 3 * ROW + 700]), st.integers(0, 2**31 - 1), st.integers(0, 2))
def test_a_buffer_of_any_length_updates_as_its_padding_to_whole_rows(n, seed, shift):
    """An exact-size buffer (an activation read in place) gives, bit for bit, the state of
    the same values padded with `x[0]` to a multiple of `ROW` — every observer, any length,
    including histograms that sample rows (the partial row is one of the rows)."""
    x = (np.random.default_rng(seed).standard_normal(n) + shift).astype(np.float32)
    padded, n_valid = _padded(x, -(-n // ROW) * ROW)
    for observer in (
        jaxq.running_minmax(),
        jaxq.batch_percentile_minmax(16),
        jaxq.sigma_statistic(25.0),
        jaxq.histogram_observer(bins=64, max_rows=2),
        jaxq.histogram_observer(bins=64, max_rows=0),
    ):
        state = observer.init()
        exact, whole = state, state
        for _ in range(3):  # later batches: a histogram's sampling phase moves and its range re-bins
            exact = jaxq.update_observer(exact, jnp.asarray(x), jnp.int32(n), observer)
            whole = jaxq.update_observer(whole, padded, n_valid, observer)
        for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(whole)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{observer} n={n}")
