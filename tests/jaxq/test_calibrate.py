import jax
import pytest
import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq import QScheme
from jaxq.calibrate import bucket_keys, map_buckets, quantize_weight

SCHEME = QScheme(8, True, True, axis=0)


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(16, 3, 3, 3), (16, 3, 3, 3), (32, 16, 1, 1), (16, 3, 3, 3), (10, 64)]
    return {f"l{i}": jnp.asarray(rng.standard_normal(s).astype(np.float32)) for i, s in enumerate(shapes)}


def test_buckets_group_equal_shapes_in_order():
    assert bucket_keys(_weights()) == {
        ((16, 3, 3, 3), "float32"): ["l0", "l1", "l3"],
        ((32, 16, 1, 1), "float32"): ["l2"],
        ((10, 64), "float32"): ["l4"],
    }


def test_bucketed_equals_one_at_a_time():
    ws = _weights()
    out = jaxq.quantize_weights(ws, SCHEME)
    assert list(out) == list(ws)
    for name, w in ws.items():
        ref = quantize_weight(w, SCHEME)
        np.testing.assert_array_equal(out[name].q, np.asarray(ref.q))
        np.testing.assert_array_equal(out[name].qparams.scale, np.asarray(ref.qparams.scale))


def test_one_compile_per_bucket_and_none_on_second_run():
    ws = _weights(1)
    scheme = QScheme(6, True, False, axis=0)  # a scheme no other test uses: cold cache
    with jaxq.compile_count() as first:
        jaxq.quantize_weights(ws, scheme)
    assert 1 <= first.count <= 3
    with jaxq.compile_count() as second:
        jaxq.quantize_weights(_weights(2), scheme)
    assert second.count == 0


def test_map_buckets_runs_large_buckets_in_slices_of_what_fits():
    ws = {f"l{i}": jnp.full((4, 8), float(i)) for i in range(5)}  # 128 bytes each
    calls, done = [], []

    def fn(stacked):
        calls.append(stacked.shape[0])
        return stacked * 2

    out = map_buckets(fn, ws, done.append, max_bytes=300)
    assert calls == [2, 2, 1] and done == [2, 2, 1] and list(out) == list(ws)
    for name, w in ws.items():
        np.testing.assert_array_equal(out[name], w * 2)
    calls.clear()
    map_buckets(fn, ws, max_bytes=10)  # less than one layer: one at a time
    assert calls == [1] * 5


def test_finalize_activations_buckets_states():
    obs = jaxq.batch_percentile_minmax(16)
    states = {}
    for i in range(3):
        s = obs.init()
        buf = jnp.full((1024,), float(i), jnp.float32).at[:3].set(jnp.array([-1.0 * i, 2.0 * i, 0.5]))
        states[f"a{i}"] = jaxq.update_observer(s, buf, jnp.int32(3), obs)
    scheme = QScheme(8, False, False)
    out = jaxq.finalize_activations(states, obs, scheme)
    assert float(out["a2"].lo) == -2.0 and float(out["a2"].hi) == 4.0
    with jaxq.compile_count() as c:
        jaxq.finalize_activations(states, obs, scheme)
    assert c.count == 0


def test_finalize_activations_finalizes_a_shared_state_once(monkeypatch):
    obs = jaxq.running_minmax()
    shared = jaxq.update_observer(obs.init(), jnp.arange(1024.0, dtype=jnp.float32), jnp.int32(1024), obs)
    other = jaxq.update_observer(obs.init(), -jnp.ones(1024, jnp.float32), jnp.int32(1024), obs)
    states = {"q": shared, "k": shared, "o": other, "v": shared}
    sizes = []
    bucket = jaxq.calibrate.finalize_activation_bucket
    monkeypatch.setattr(
        jaxq.calibrate,
        "finalize_activation_bucket",
        lambda st, *a, **k: sizes.append(st.lo.shape[0]) or bucket(st, *a, **k),
    )
    out = jaxq.finalize_activations(states, obs, QScheme(8, False, False))
    assert sizes == [2] and list(out) == ["q", "k", "o", "v"]
    assert float(out["v"].hi) == float(out["q"].hi) == 1023.0 and float(out["o"].lo) == -1.0


from hypothesis import given, settings, strategies as st  # noqa: E402

_quantize_weight_jit = jax.jit(quantize_weight, static_argnums=1)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 9), st.integers(1, 3)), min_size=1, max_size=5),
    bits=st.sampled_from([2, 4, 8]),
    signed=st.booleans(),
    symmetric=st.booleans(),
    positive=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_padded_buckets_equal_one_at_a_time(shapes, bits, signed, symmetric, positive, seed):
    """Zero padding to shared size buckets changes no scale, offset or code."""
    rng = np.random.default_rng(seed)
    ws = {f"l{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    if positive:  # all-positive channels: the padded zeros lie outside their range
        ws = {n: np.abs(w) + 0.5 for n, w in ws.items()}
    scheme = QScheme(bits, signed, symmetric, axis=0)
    out = jaxq.quantize_weights(ws, scheme)
    for name, w in ws.items():  # compiled like the bucket (XLA divides by a constant through its reciprocal)
        ref = _quantize_weight_jit(jnp.asarray(w), scheme)
        np.testing.assert_array_equal(np.asarray(out[name].qparams.scale), np.asarray(ref.qparams.scale))
        np.testing.assert_array_equal(np.asarray(out[name].qparams.offset), np.asarray(ref.qparams.offset))
        np.testing.assert_array_equal(np.asarray(out[name].q), np.asarray(ref.q))


def test_many_weight_shapes_compile_few_programs():
    rng = np.random.default_rng(0)
    ws = {f"l{i}": rng.standard_normal((32 + i, 3, 3, 3)).astype(np.float32) for i in range(9)}
    ws |= {f"k{i}": rng.standard_normal((8 * i + 1, 20 + i)).astype(np.float32) for i in range(1, 4)}
    with jaxq.compile_count() as c:
        out = jaxq.quantize_weights(ws, QScheme(6, True, True, axis=0))
    assert c.count == 1  # 12 shapes, row widths 20–27: one padded width (32) under min-max
    for name, w in ws.items():
        ref = quantize_weight(jnp.asarray(w), QScheme(6, True, True, axis=0))
        np.testing.assert_array_equal(out[name].q, np.asarray(ref.q))
        np.testing.assert_array_equal(out[name].qparams.scale, np.asarray(ref.qparams.scale))


@pytest.mark.parametrize("call_floats", [None, 24 * 8])
def test_map_rows_packs_layers_of_one_padded_width_and_gives_each_its_rows(call_floats, monkeypatch):
    """`call_floats=24·8`: eight rows per call, so layers span calls and share them."""
    from jaxq import calibrate
    from jaxq.calibrate import map_rows, weight_rows_per_call

    if call_floats is not None:
        monkeypatch.setattr(calibrate, "WEIGHT_CALL_FLOATS", call_floats)

    rng = np.random.default_rng(0)
    inputs = {
        n: (rng.standard_normal((r, k)).astype(np.float32), rng.standard_normal(r).astype(np.float32))
        for n, r, k in [("a", 3, 21), ("b", 70, 23), ("c", 5, 9)]
    }  # widths 21 and 23 pad to 24
    fn = jax.jit(lambda chunk: (chunk[0] * 2.0, chunk[0].sum(-1) + chunk[1]))
    with jaxq.compile_count() as c:
        out = map_rows(fn, inputs)
    assert c.count <= 2  # one program per padded width: 24 (a, b) and 10 (c); none new for the same shapes
    for n, (m, v) in inputs.items():
        np.testing.assert_array_equal(out[n][0], m * 2.0)
        np.testing.assert_allclose(out[n][1], m.sum(-1) + v, rtol=1e-5, atol=1e-6)
    if call_floats is None:
        assert c.count == 2 and weight_rows_per_call(24) == 4096 and weight_rows_per_call(1 << 20) == 8


def test_stacked_observer_updates_equal_one_update_per_layer():
    """Buffers of one size, states stacked: the vmapped update is each layer's own update,
    bit for bit, and a second batch with other valid lengths compiles nothing new."""
    from jaxq.calibrate import stack_states, unstack_states

    obs = jaxq.histogram_observer(bins=64, max_rows=2)
    rng = np.random.default_rng(0)
    states = [obs.init() for _ in range(3)]
    want = list(states)
    for batch, n_valid in enumerate(([4096, 3000, 1], [2500, 4096, 4000])):
        xs = tuple(jnp.asarray(rng.standard_normal(4096).astype(np.float32) * (i + 1)) for i in range(3))
        with jaxq.compile_count() as c:
            stacked = jaxq.update_stacked_observers(stack_states(states), xs, np.array(n_valid, np.int32), obs)
        if batch:
            assert c.count == 0
        states = unstack_states(stacked, 3)
        want = [jaxq.update_observer(s, x, jnp.int32(n), obs) for s, x, n in zip(want, xs, n_valid)]
        for got, ref in zip(states, want):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="one size"):
        jaxq.update_stacked_observers(stack_states(states[:2]), (xs[0], xs[1][:1024]), np.ones(2, np.int32), obs)
