import dataclasses

import jax
import pytest

from jaxq import KeepAcc, QuantConfig
from jaxq.keep_acc import AdaRound, Admm, Blocks, Gptq, RoundOpt


def test_seed_example_runs_as_written():
    disable_names = []
    input_shape = [1, 3, 224, 224]
    keep_acc = {"admm": [False, 1000], "easy_quant": [False, 1000], "round_opt": False}
    quant_config = QuantConfig(disable_names=disable_names, amp_num=0, input_shape=input_shape, keep_acc=keep_acc)
    assert quant_config.input_shape == ((1, 3, 224, 224),)
    assert quant_config.keep_acc == KeepAcc()


def test_defaults_match_the_seed_page():
    c = QuantConfig()
    assert (c.w_bit, c.a_bit, c.w_signed, c.a_signed, c.w_sym, c.a_sym) == (8, 8, True, False, True, False)
    assert (c.input_shape, c.act_quant, c.act_method, c.quant_mode) == (None, True, 0, 0)
    assert (c.disable_names, c.amp_num, c.sigma, c.device) == ((), 0, 25, "cpu")
    assert c.keep_acc.as_dict() == {
        "admm": [False, 1000],
        "easy_quant": [False, 1000],
        "round_opt": False,
        "adaround": [False, 1000],
        "brecq": [False, 300],
        "qdrop": [False, 300],
        "pd_quant": [False, 200],
    }


def test_frozen_hashable_pytree_and_static_arg():
    c = QuantConfig(disable_names=["a", "b"], input_shape=[[1, 3], [1, 4]])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.w_bit = 4
    assert hash(c) == hash(QuantConfig(disable_names=("a", "b"), input_shape=((1, 3), (1, 4))))
    assert jax.tree_util.tree_leaves(c) == []
    assert jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(c), []) == c

    @jax.jit
    def f(x, cfg):
        return x * cfg.w_bit

    assert float(f(1.0, c)) == 8.0  # a pytree with no leaves traces as a constant


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
def test_bit_widths_accepted(bits):
    c = QuantConfig(w_bit=bits, a_bit=bits)
    assert c.weight_scheme.bits == bits and c.act_scheme.bits == bits


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(w_bit=1), ["w_bit", "1", "allowed"]),
        (dict(a_bit=9), ["a_bit", "9"]),
        (dict(act_method=3), ["act_method", "3", "(0, 1, 2)"]),
        (dict(quant_mode=2), ["quant_mode", "2"]),
        (dict(keep_acc={"admm": [True, 10], "foo": 1}), ["keep_acc", "foo", "allowed keys"]),
        (dict(keep_acc={"admm": [True, 0]}), ["admm", "iterations"]),
        (dict(input_shape=[1, -3, 4]), ["input_shape", "positive"]),
        (dict(input_shape=[[1, 2], ["a"]]), ["input_shape"]),
        (dict(amp_num=-1), ["amp_num"]),
        (dict(sigma=-1), ["sigma"]),
        (dict(device="tpu"), ["device", "tpu", "npu"]),
        (dict(minmax_combine="median"), ["minmax_combine", "running"]),
        (dict(hist_samples=-1), ["hist_samples", "-1", "every value"]),
    ],
)
def test_bad_values_name_field_value_and_allowed(kwargs, words):
    with pytest.raises(ValueError) as e:
        QuantConfig(**kwargs)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    "kwargs", [dict(w_sym=1), dict(act_quant="yes"), dict(disable_names="conv1"), dict(keep_acc=[1])]
)
def test_wrong_types(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        QuantConfig(**kwargs)


def test_schemes_and_replace():
    c = QuantConfig(w_bit=4, w_sym=False, a_signed=True)
    assert (c.weight_scheme.qmin, c.weight_scheme.qmax, c.weight_scheme.axis) == (-8, 7, 0)
    assert (c.act_scheme.qmin, c.act_scheme.qmax, c.act_scheme.axis) == (-128, 127, None)
    assert QuantConfig(a_signed=False).act_scheme.qmax == 255
    with pytest.raises(ValueError, match="w_bit"):
        c.replace(w_bit=1)
    assert c.replace(w_bit=8).w_bit == 8


def test_round_opt_accepts_list_form():
    assert QuantConfig(keep_acc={"round_opt": [True]}).keep_acc.round_opt == RoundOpt()


def test_keep_acc_is_typed_records_and_writes_back_the_list_form():
    ka = QuantConfig(keep_acc={"admm": [True, 7], "easy_quant": [False, 5], "qdrop": [True, 20], "gptq": True}).keep_acc
    assert ka.admm == Admm(7) and ka.easy_quant is None and ka.blocks == Blocks(20, 0.5) and ka.gptq == Gptq()
    assert QuantConfig(keep_acc=ka.as_dict()).keep_acc == ka  # msModelSlim's form round-trips
    typed = KeepAcc(adaround=AdaRound(50), brecq=Blocks(10))
    assert QuantConfig(keep_acc=typed).keep_acc.as_dict()["adaround"] == [True, 50]
    assert QuantConfig(keep_acc={"gptq": {"block_size": 32, "act_order": False}}).keep_acc.gptq == Gptq(32, 0.01, False)


@pytest.mark.parametrize(
    "keep_acc, words",
    [
        (KeepAcc(admm=(True, 5)), ["keep_acc.admm", "Admm"]),
        (KeepAcc(adaround=AdaRound(0)), ["adaround", "iterations=0"]),
        ({"gptq": {"damp": 2.0}}, ["gptq", "damp=2.0"]),
        ({"gptq": {"blocksize": 8}}, ["gptq", "blocksize", "block_size"]),
        ({"gptq": "yes"}, ["gptq", "'yes'"]),
    ],
)
def test_bad_keep_acc_settings_are_named(keep_acc, words):
    with pytest.raises((TypeError, ValueError)) as e:
        QuantConfig(keep_acc=keep_acc)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_w_group_size_is_checked_and_refuses_per_channel_steps():
    assert QuantConfig(w_group_size=128, keep_acc={"gptq": True}).w_group_size == 128
    for bad in (1, 0, 2.5, "128", True):
        with pytest.raises(ValueError, match=r"w_group_size=.* must be an int ≥ 2"):
            QuantConfig(w_group_size=bad)
    for step in ("adaround", "brecq", "qdrop", "pd_quant"):
        assert QuantConfig(w_group_size=128, keep_acc={step: [True, 10]}).w_group_size == 128
    for step, value in (("admm", [True, 10]), ("round_opt", True), ("easy_quant", [True, 10])):
        with pytest.raises(ValueError, match=rf"keep_acc \['{step}'\] choose per-channel"):
            QuantConfig(w_group_size=64, keep_acc={step: value})
