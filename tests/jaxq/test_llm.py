"""`jaxq.llm`: the decoder quantization config and its plan."""

import pytest

from jaxq.keep_acc import Gptq
from jaxq.llm import LlmConfig, plan


def test_plan_orders_rotation_awq_and_codes():
    assert plan(LlmConfig(method="rtn")) == ("capture", "rtn", "write")
    assert plan(LlmConfig(method="gptq")) == ("capture", "gptq", "write")
    assert plan(LlmConfig(method="awq+gptq", rotate=True)) == ("rotate", "capture", "awq", "clip", "gptq", "write")
    assert plan(LlmConfig(method="rtn", clip=True)) == ("capture", "clip", "rtn", "write")
    assert plan(LlmConfig(method="awq", clip=False)) == ("capture", "awq", "rtn", "write")
    assert LlmConfig(method="awq", w_bit=3).describe() == "W3A16 g128 awq"
    assert LlmConfig(w_bit=8, group_size=None, a_bit=8, activations="dynamic").describe() == "W8A8 dynamic gptq"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="squant"), "method='squant'"),
        (dict(w_bit=9), "w_bit=9"),
        (dict(group_size=0), "group_size=0"),
        (dict(a_bit=8), "set both"),
        (dict(a_bit=8, activations="per_token"), "activations='per_token'"),
        (dict(gptq=(128, 0.01, True)), "jaxq.keep_acc.Gptq"),
        (dict(rotate="yes"), "rotate='yes'"),
    ],
)
def test_bad_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlmConfig(**kwargs)


def test_config_is_hashable_and_frozen():
    cfg = LlmConfig(gptq=Gptq(block_size=64))
    assert hash(cfg) == hash(LlmConfig(gptq=Gptq(block_size=64)))
    with pytest.raises(AttributeError):
        cfg.w_bit = 3
