import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch import nn

import jaxq
import bridge.capture.activations as capture_module
from bridge.capture.activations import ActivationCapture, BufferPool
from jaxq.observer_choice import observer_for


class Twice(nn.Module):
    """`a` runs twice per forward: its second input must not overwrite the first."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


def _reference_states(model, batches, observer):
    """Every input of every call fed to the observer one at a time, in call order."""
    inputs = {n: [] for n in ("a", "b")}
    hooks = [
        getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach().clone()))
        for n in inputs
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    states = {}
    for name, xs in inputs.items():
        state = observer.init()
        for x in xs:
            flat = x.reshape(-1).numpy()
            buf = np.full(capture_module.bucket_size(flat.size), flat[0], np.float32)  # padded as the pool pads
            buf[: flat.size] = flat
            state = jaxq.update_observer(state, buf, np.int32(flat.size), observer)
        states[name] = state
    return states


@pytest.mark.parametrize("max_pending", [1 << 26, 1024])
def test_grouped_updates_equal_one_update_per_call(max_pending):
    torch.manual_seed(0)
    model = Twice()
    batches = [torch.randn(n, 4) * s for n, s in ((3, 1.0), (5, 4.0), (2, 0.5))]
    observer = jaxq.running_minmax()
    capture = ActivationCapture({"a": model.a, "b": model.b}, observer, max_pending=max_pending)
    with capture, torch.no_grad():
        for x in batches:
            model(x)
            capture.flush()
    ref = _reference_states(model, batches, observer)
    for name in ("a", "b"):
        got, want = capture.states[name], ref[name]
        assert float(got.lo) == float(want.lo) and float(got.hi) == float(want.hi)
        assert int(got.count) == int(want.count) == (6 if name == "a" else 3)


def test_exit_flushes_the_last_batch_and_a_failed_forward_is_dropped():
    model = Twice()
    observer = jaxq.running_minmax()
    capture = ActivationCapture({"a": model.a, "b": model.b}, observer)
    with capture, torch.no_grad():
        model(torch.ones(2, 4))
    assert int(capture.states["a"].count) == 2 and int(capture.states["b"].count) == 1
    capture = ActivationCapture({"a": model.a, "b": model.b}, observer)
    with pytest.raises(RuntimeError), capture, torch.no_grad():
        model(torch.ones(2, 4))
        raise RuntimeError("forward failed")
    # a's first call was applied when its second came; the pending rest is dropped
    assert int(capture.states["a"].count) == 1 and int(capture.states["b"].count) == 0


def test_buffer_pool_reuses_released_buffers_and_pads_with_the_first_value():
    pool = BufferPool()
    v1, n1 = pool.fill(torch.arange(3.0) + 5)
    v2, _ = pool.fill(torch.ones(10))
    assert n1 == 3 and v1.shape == (1024,) and float(v1[3]) == 5.0 and float(v1[-1]) == 5.0
    assert v1.unsafe_buffer_pointer() != v2.unsafe_buffer_pointer()  # both taken: two buffers
    pool.release()
    v3, _ = pool.fill(torch.zeros(7))
    assert v3.unsafe_buffer_pointer() in (v1.unsafe_buffer_pointer(), v2.unsafe_buffer_pointer())


class SharedInput(nn.Module):
    """q, k and v read the same tensor; `bump` changes it in place before v (so v must not
    share k's update); `o` reads another tensor."""

    def __init__(self, width: int, bump: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, 4) for _ in range(4))
        self.bump = bump

    def forward(self, x):
        y = self.q(x) + self.k(x)
        if self.bump:
            x.mul_(3.0)
        return y + self.v(x) + self.o(x + 1.0)


def _capture(model, names, batches, observer):
    capture = ActivationCapture({n: getattr(model, n) for n in names}, observer)
    with capture, torch.no_grad():
        for x in batches:
            model(x.clone())
            capture.flush()
    return capture


def _each_alone(model, names, batches, observer):
    """Reference: every layer captured on its own (no sharing possible)."""
    return {n: _capture(model, [n], batches, observer).states[n] for n in names}


def _assert_states_equal(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bump", [False, True])
def test_layers_fed_the_same_tensor_share_one_update(bump):
    torch.manual_seed(0)
    model, names = SharedInput(8, bump), ["q", "k", "v", "o"]
    batches = [torch.randn(3, 8) * s for s in (1.0, 5.0)]
    observer = jaxq.histogram_observer(64, 256)
    capture = _capture(model, names, batches, observer)
    want = _each_alone(model, names, batches, observer)
    for n in names:
        _assert_states_equal(capture.states[n], want[n])
    assert capture.states["k"] is capture.states["q"]  # one update, shared
    assert (capture.states["v"] is capture.states["q"]) is not bump  # changed in place: its own update
    assert capture.states["o"] is not capture.states["q"]


@pytest.mark.parametrize("width", [1024, 1000])  # 1000: a size that is not whole rows of `ROW`
def test_large_inputs_are_observed_in_place(monkeypatch, width):
    torch.manual_seed(1)
    rows = capture_module.IN_PLACE_MIN // width + 1  # just above the in-place threshold
    model, names = SharedInput(width), ["q", "o"]
    batches = [torch.randn(rows, width) * s for s in (1.0, 3.0, 0.5)]
    observer = jaxq.sigma_statistic(3.0)
    capture = _capture(model, names, batches, observer)
    assert capture._in_place_sizes["q"] == {rows * width}
    exact = observer.init()  # in place: the observer's update of each batch as it is
    for b in batches:
        exact = jaxq.update_observer(exact, jnp.asarray(b.numpy().reshape(-1)), np.int32(b.numel()), observer)
    _assert_states_equal(capture.states["q"], exact)
    monkeypatch.setattr(capture_module, "IN_PLACE_MIN", 1 << 40)  # everything through the buffers
    bucketed = _capture(model, names, batches, observer)
    assert not bucketed._in_place_sizes["q"]
    for n in names:  # the same values; moments summed in another order
        got, want = capture.states[n], bucketed.states[n]
        assert (float(got.lo), float(got.hi), int(got.count)) == (float(want.lo), float(want.hi), 3)
        np.testing.assert_allclose(np.asarray(got.moments), np.asarray(want.moments), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got.pos_moments), np.asarray(want.pos_moments), rtol=1e-5)


def test_a_layer_with_many_large_sizes_falls_back_to_buckets():
    width = 1024
    base = capture_module.IN_PLACE_MIN // width
    model = SharedInput(width)
    batches = [torch.full((base + k, width), float(k)) for k in (1, 2, 3, 1)]
    observer = jaxq.running_minmax()
    capture = _capture(model, ["q"], batches, observer)
    assert capture._in_place_sizes["q"] == {(base + 1) * width, (base + 2) * width}
    state = capture.states["q"]
    assert (float(state.lo), float(state.hi), int(state.count)) == (1.0, 3.0, 4)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 1 << 27))
def test_bucket_sizes_hold_the_input_in_whole_rows_with_at_most_a_quarter_padding(n):
    size = capture_module.bucket_size(n)
    assert size >= max(n, capture_module.MIN_BUCKET) and size % jaxq.observers.ROW == 0
    if n > 4 * capture_module.MIN_BUCKET:
        assert size <= 1.25 * n
    assert capture_module.bucket_size(size) == size  # a bucket size is its own bucket


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("observer", [jaxq.running_minmax(), observer_for(jaxq.QuantConfig(act_method=2), 5)])
def test_batches_of_other_sizes_update_one_program_per_size_with_the_same_states(observer, monkeypatch):
    """Text of varying length: the first batch's sizes run as one call, other batches one
    vmapped call per buffer size — the states equal one update per layer and batch."""
    torch.manual_seed(0)
    model = _Seq().eval()
    batches = [torch.randn(1, L, 8) * s for L, s in ((10, 1.0), (70, 3.0), (10, 0.5), (200, 2.0), (33, 1.0))]
    calls = []
    one_size = jaxq.update_stacked_observers
    monkeypatch.setattr(jaxq, "update_stacked_observers", lambda *a: calls.append(len(a[1])) or one_size(*a))
    capture = ActivationCapture({"a": model.a, "b": model.b}, observer)
    with capture, torch.no_grad():
        for x in batches:
            model(x)
            capture.flush()
    assert calls  # the 70-, 200- and 33-token batches have other buffer sizes than the first
    ref = _reference_states(model, batches, observer)
    for name in ("a", "b"):
        for got, want in zip(jax.tree.leaves(capture.states[name]), jax.tree.leaves(ref[name])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_layers_of_one_buffer_size_stay_stacked_from_batch_to_batch(monkeypatch):
    """Batches whose layers fall into the same buffer-size groups reuse the stacked states
    the last update returned (no unstacking and restacking); the states equal one update per
    layer and batch, and a state read in between (the first batch's sizes again) is unstacked."""
    torch.manual_seed(0)
    model = _Seq().eval()
    observer = jaxq.running_minmax()
    stacked = []
    stack = capture_module.stack_states
    monkeypatch.setattr(capture_module, "stack_states", lambda trees: stacked.append(len(trees)) or stack(trees))
    lengths = ((10, 1.0), (300, 3.0), (300, 0.5), (290, 2.0), (10, 4.0), (300, 1.0))
    batches = [torch.randn(1, L, 8) * s for L, s in lengths]
    capture = ActivationCapture({"a": model.a, "b": model.b}, observer)
    with capture, torch.no_grad():
        for x in batches[:2]:
            model(x)
            capture.flush()
        with jaxq.compile_count() as programs:  # the groups' programs exist: later batches compile nothing
            for x in batches[2:]:
                model(x)
                capture.flush()
    assert programs.count == 0
    assert stacked == [1, 1, 1, 1]  # 300 tokens stacks "a" and "b" once; after the first batch's sizes once more
    ref = _reference_states(model, batches, observer)
    for name in ("a", "b"):
        for got, want in zip(jax.tree.leaves(capture.states[name]), jax.tree.leaves(ref[name])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_first_batch_compiles_the_program_later_batches_use():
    """Initial observer states are committed like the updates' results: one program, not two."""
    torch.manual_seed(0)
    model = _Seq().eval()
    observer = observer_for(jaxq.QuantConfig(act_method=2, hist_samples=3 << 10), 7)  # settings no other test uses
    capture = ActivationCapture({"a": model.a, "b": model.b}, observer)
    with jaxq.compile_count() as programs, capture, torch.no_grad():
        for _ in range(3):
            model(torch.randn(1, 10, 8))
            capture.flush()
    assert programs.count + programs.loaded == 1
