"""Shared by the reliability tests: the digits CNN with its float outputs, and the check
that a user's model is exactly as it was (state_dict, module types, parameter objects, outputs)."""

import pytest
import torch

from bridge.inplace.fakequant import model_quantizers
from bridge.models.digits import load_digits_cnn


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        [id(p) for p in model.parameters()],
    )


def _assert_unchanged(model, before, x, ref):
    state, types, params = before
    now = model.state_dict()
    assert list(now) == list(state)
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert [id(p) for p in model.parameters()] == params
    assert not model_quantizers(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.fixture
def snapshot():
    return _snapshot


@pytest.fixture
def assert_unchanged():
    return _assert_unchanged


@pytest.fixture
def model_and_ref(digits_calib):
    """`(model, x, float output on x, snapshot)` of a fresh digits CNN."""
    model = load_digits_cnn()
    x = digits_calib[0]
    with torch.no_grad():
        ref = model(x)
    return model, x, ref, _snapshot(model)
