"""The captures the fitting steps share (`bridge.jax_model.fitting`)."""

import numpy as np
import pytest
import torch
from torch import nn

from bridge.capture.data import Batch
from bridge.jax_model.fitting import _HostStack, capture_block
from bridge.jax_model.lower import LoweringError


class _Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * 2


class _Net(nn.Module):
    """A block, then a layer after it inside a model that catches `Exception` itself."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.after = _Counted()

    def forward(self, x):
        try:
            return self.after(self.block(x))
        except Exception:  # noqa: BLE001 — a model that hides its own errors must not hide the capture's stop
            return x


def test_capture_stops_each_forward_after_the_block_and_stacks_its_inputs_and_output():
    torch.manual_seed(0)
    model = _Net()
    batches = [(i, Batch((torch.randn(3, 4),), {})) for i in range(4)]
    got = capture_block(model, "block", batches)
    assert model.after.calls == 0  # nothing after the block ran
    args, kwargs = got.inputs
    assert kwargs == {} and got.static == (1, [0], {}, {})
    x = torch.cat([b.args[0] for _, b in batches])
    np.testing.assert_array_equal(np.asarray(args[0]), x.numpy())
    per_batch = torch.cat([model.block(b.args[0]) for _, b in batches]).detach()
    np.testing.assert_array_equal(np.asarray(got.output), per_batch.numpy())
    torch.testing.assert_close(got.example.args[0], batches[0][1].args[0], rtol=0, atol=0)
    assert capture_block(model, "block", batches, inputs=False).inputs is None
    assert capture_block(model, "block", batches, output=False).output is None
    assert model(batches[0][1].args[0]).shape == (3, 4) and model.after.calls == 1  # the model still runs whole


def test_inputs_are_taken_before_the_blocks_own_pre_hooks_which_the_lowered_block_runs_again():
    """A block with a pre-hook that changes its input (an input rotation, the quantizer's
    tap): the capture holds what the block is called with, not what its forward sees."""
    torch.manual_seed(0)
    model = _Net()
    model.block.register_forward_pre_hook(lambda _m, args: (args[0] * 3,))
    batches = [(i, Batch((torch.randn(3, 4),), {})) for i in range(2)]
    got = capture_block(model, "block", batches)
    x = torch.cat([b.args[0] for _, b in batches])
    np.testing.assert_array_equal(np.asarray(got.inputs[0][0]), x.numpy())
    per_batch = torch.cat([model.block(b.args[0]) for _, b in batches]).detach()
    np.testing.assert_array_equal(np.asarray(got.output), per_batch.numpy())
    only_inputs = capture_block(model, "block", batches, output=False)
    np.testing.assert_array_equal(np.asarray(only_inputs.inputs[0][0]), x.numpy())


def test_a_stack_is_held_once_grows_for_a_larger_batch_and_names_a_misfit():
    stack = _HostStack(batches=2)
    parts = [torch.randn(2, 3), torch.randn(5, 3)]  # the second is larger than the first
    for t in parts:
        stack.add(t, "x")
    buf = stack.buf
    out = stack.to_jax()
    np.testing.assert_array_equal(np.asarray(out), torch.cat(parts).numpy())
    assert out.unsafe_buffer_pointer() == buf.data_ptr()  # JAX reads the stack in place, no copy
    stack = _HostStack(batches=2)
    stack.add(torch.randn(2, 3), "x")
    with pytest.raises(LoweringError, match=r"block 'b'\'s input 0 in batch 1 has shape \(2, 4\)"):
        stack.add(torch.randn(2, 4), "block 'b''s input 0 in batch 1")
