"""The captures the fitting steps share (`bridge.jax_model.fitting`)."""

import torch
from torch import nn

from bridge.capture.data import Batch
from bridge.jax_model.fitting import capture_io


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


def test_capture_stops_each_forward_after_the_block_and_keeps_its_inputs_and_output():
    torch.manual_seed(0)
    model = _Net()
    batches = [(i, Batch((torch.randn(3, 4),), {})) for i in range(4)]
    args, kwargs, outs = capture_io(model, "block", batches)
    assert model.after.calls == 0  # nothing after the block ran
    assert len(args) == len(outs) == 4 and kwargs == [{}] * 4
    for (_, b), a, y in zip(batches, args, outs):
        torch.testing.assert_close(a[0], b.args[0], rtol=0, atol=0)
        torch.testing.assert_close(y, model.block(b.args[0]), rtol=0, atol=0)
    assert model(batches[0][1].args[0]).shape == (3, 4) and model.after.calls == 1  # the model still runs whole
