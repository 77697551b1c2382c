import numpy as np
import pytest
import torch
from torch import nn

import jaxq
from bridge.capture import ActivationCapture, BufferPool


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
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach().clone()))
             for n in inputs]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    states = {}
    for name, xs in inputs.items():
        state = observer.init()
        for x in xs:
            buf = np.full(1024, x.reshape(-1)[0].item(), np.float32)
            buf[: x.numel()] = x.reshape(-1).numpy()
            state = jaxq.update_observer(state, buf, np.int32(x.numel()), observer)
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
