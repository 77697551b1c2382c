"""`plan(cfg)`: the one place the order of the algorithms is written."""

import pytest

from jaxq import QuantConfig
from jaxq.keep_acc import Admm, Blocks
from jaxq.easyquant import ROWS_USED
from jaxq.pipeline import describe, layer_local, plan, rows_read


def names(cfg):
    return [s.name for s in plan(cfg.resolved(representative_data=True))]


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (QuantConfig(), ["activations", "weights", "bias_correction"]),
        (QuantConfig(act_quant=False, bias_correction=False), ["weights"]),
        (
            QuantConfig(
                keep_acc={"admm": [True, 5], "easy_quant": [True, 10], "round_opt": True, "adaround": [True, 9]}
            ),
            ["activations", "weights", "easy_quant", "round_opt", "adaround", "bias_correction"],
        ),
        (
            QuantConfig(smooth_quant=0.5, keep_acc={"gptq": True, "qdrop": [True, 3]}, amp_num=2),
            ["smooth_quant", "activations", "weights", "gptq", "blocks", "bias_correction", "fallback"],
        ),
        (
            QuantConfig(keep_acc={"brecq": [True, 3], "qdrop": [True, 4]}, bias_correction=False),
            ["activations", "weights", "blocks"],
        ),
        (
            QuantConfig(keep_acc={"adaround": [True, 9], "pd_quant": [True, 5]}, amp_num=1),
            ["activations", "weights", "adaround", "bias_correction", "pd_quant", "fallback"],
        ),
    ],
)
def test_plan_orders_the_steps(cfg, expected):
    steps = plan(cfg.resolved(representative_data=True))
    print(describe(steps))
    assert [s.name for s in steps] == expected
    assert steps[-1].name in ("weights", "bias_correction", "fallback", "blocks")
    # the step sizes are fitted to the final weights, bias correction included
    if "pd_quant" in expected:
        assert expected.index("pd_quant") > max(expected.index(s) for s in ("weights", "adaround", "bias_correction"))
    if "bias_correction" in expected:  # after every step that changes the weights
        last_weight_step = max(
            i
            for i, s in enumerate(steps)
            if s.name in ("weights", "easy_quant", "round_opt", "adaround", "gptq", "blocks")
        )
        assert expected.index("bias_correction") > last_weight_step


def test_steps_carry_their_settings_and_reads():
    steps = {
        s.name: s
        for s in plan(
            QuantConfig(keep_acc={"admm": [True, 5], "qdrop": [True, 4]}, amp_num=3).resolved(representative_data=False)
        )
    }
    assert steps["weights"].settings == Admm(5) and steps["blocks"].settings == Blocks(4, 0.5)
    assert steps["fallback"].settings == 3 and steps["fallback"].reads == ("outputs",)
    assert "bias_correction" not in steps  # data-free: bias correction off by default
    assert not layer_local(steps["weights"]) and not layer_local(steps["blocks"])


def test_layer_local_steps_are_the_row_and_rounding_steps():
    steps = plan(
        QuantConfig(keep_acc={"easy_quant": [True, 10], "round_opt": True, "adaround": [True, 9], "gptq": True})
    )
    assert [s.name for s in steps if layer_local(s)] == ["easy_quant", "round_opt", "gptq", "adaround"]
    assert next(s for s in steps if s.name == "adaround").settings.from_codes  # refines GPTQ's codes
    alone = plan(QuantConfig(keep_acc={"adaround": [True, 9]}))
    assert not next(s for s in alone if s.name == "adaround").settings.from_codes


def test_blocks_refine_the_codes_of_a_rounding_step_before_them():
    def blocks(**keep_acc):
        return next(s for s in plan(QuantConfig(keep_acc=keep_acc)) if s.name == "blocks").settings

    assert blocks(qdrop=[True, 5], adaround=[True, 9]).from_codes
    assert blocks(brecq=[True, 5], gptq=True).from_codes
    assert not blocks(qdrop=[True, 5]).from_codes
    assert not blocks(qdrop=[True, 5], easy_quant=[True, 10], admm=[True, 10]).from_codes  # scales, not codes


def test_rows_read_is_what_the_row_steps_of_a_chain_read():
    def chain(**keep_acc):
        return [s for s in plan(QuantConfig(keep_acc=keep_acc)) if layer_local(s)]

    assert rows_read(chain(easy_quant=[True, 10]), 2048) == ROWS_USED < 2048
    assert rows_read(chain(easy_quant=[True, 10]), 300) == 300
    assert rows_read(chain(easy_quant=[True, 10], adaround=[True, 9]), 2048) == 2048  # AdaRound reads them all
    assert rows_read(chain(round_opt=True), 2048) == 0
