import warnings

import numpy as np
import pytest
import torch
from torch import nn

import jaxq
from bridge import Calibrator
from bridge.capture.data import as_batch
from bridge.evaluation import protocols
from bridge.jax_model.block_reconstruction import LayerWiseBlocks, _called, choose_blocks, find_blocks


def call_order(model: nn.Module, blocks: list[str], batch) -> list[str]:
    """`blocks` in the order the model first calls them on `batch` (those never called last)."""
    seen, missing = _called(model, blocks, batch)
    return seen + missing


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x, scale=1.0):
        return x + scale * self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Residual(8) for _ in range(3)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x, scale=0.5)  # a non-tensor argument stays a Python value in the lowered block
        return self.head(x.mean((2, 3)))


def _net_and_data():
    torch.manual_seed(0)
    return Net().eval(), [torch.randn(8, 3, 12, 12) for _ in range(4)]


def test_blocks_are_the_module_list_items_and_the_other_layers_in_call_order():
    net, data = _net_and_data()
    layers = ["stem", "blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b", "blocks.2.a", "blocks.2.b", "head"]
    blocks = find_blocks(net, layers)
    assert blocks == ["blocks.0", "blocks.1", "blocks.2", "stem", "head"]
    assert call_order(net, blocks, as_batch(data[0], 0)) == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_residual_units_with_pooling_between_them_are_blocks():
    units = nn.Sequential(Residual(8), nn.MaxPool2d(2), Residual(8), nn.MaxPool2d(2), Residual(8))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), units, nn.Flatten(), nn.Linear(8, 5))
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert find_blocks(net, layers) == ["1.0", "1.2", "1.4", "0", "3"]


def test_units_beside_a_stem_and_a_head_of_other_classes_are_blocks():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        Residual(8),
        nn.AvgPool2d(2),
        Residual(8),
        nn.Flatten(),
        nn.LazyLinear(5),
    )
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # units found: no LayerWiseBlocks warning
        assert choose_blocks(net, layers) == ["2", "4", "0", "6"]


def test_a_feature_extractor_beside_its_head_is_not_one_block():
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual(8), Residual(8))
    net = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert find_blocks(net, layers) == ["0.0", "0.1", "0.2", "3"]
    head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5))
    net = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert find_blocks(net, layers) == ["0.0", "0.1", "0.2", "3.0", "3.2"]


def test_a_model_without_units_warns_that_its_layers_are_blocks_alone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(5))
    with pytest.warns(LayerWiseBlocks, match=r"recon_blocks=\[\.\.\.\]"):
        assert choose_blocks(net, ["0", "2", "4"]) == ["0", "2", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_blocks(net, ["0", "2", "4"], ["0", "2"]) == ["0", "2", "4"]  # named: no warning
        units, _ = _net_and_data()
        layers = [n for n, m in units.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert "blocks.0" in choose_blocks(units, layers)


@pytest.mark.parametrize("key", ["brecq", pytest.param("qdrop", marks=pytest.mark.slow)])
def test_block_reconstruction_lowers_block_errors_and_writes_learned_codes(key):
    net, data = _net_and_data()
    cfg = jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False, keep_acc={key: [True, 150]})
    cal = Calibrator(net, cfg, data, progress=False).run()
    reports = cal.reports["blocks"]
    assert [r.name for r in reports] == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
    ]  # first and last layer stay float by default
    improved = [r for r in reports if r.error_after < r.error_before]
    assert len(improved) >= 2
    assert all(r.compiles >= 1 for r in reports)
    custom = [n for n, r in cal.records.items() if r.custom_codes]
    assert custom  # learned rounding differs from round to nearest somewhere
    params = cal.params()
    for n in custom:
        np.testing.assert_array_equal(params["quant_weight"][n].astype(np.int32), cal.records[n].codes)
    rtn = Calibrator(
        _net_and_data()[0], jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False), data, progress=False
    ).run()
    x = torch.cat(data)
    with torch.no_grad():
        ref = cal.fp_model(x)
        err_rec, err_rtn = (cal.model(x) - ref).pow(2).mean(), (rtn.model(x) - ref).pow(2).mean()
    assert err_rec < err_rtn  # the whole model is closer to float on its calibration data


@pytest.mark.slow
def test_digits_w3a4_qdrop_is_not_worse_than_round_to_nearest():
    p = protocols.digits(held_out=200)
    rtn = Calibrator(p.make_model(), jaxq.QuantConfig(w_bit=3, a_bit=4), p.calib_data, progress=False).run()
    qd = Calibrator(
        p.make_model(),
        jaxq.QuantConfig(w_bit=3, a_bit=4, keep_acc={"qdrop": [True, 200]}),
        p.calib_data,
        progress=False,
    ).run()
    assert p.evaluate(qd.model)["top1"] >= p.evaluate(rtn.model)["top1"] - 0.005


def test_a_block_that_cannot_lower_fails_clearly_and_restores_the_model(data_dependent_blocks):
    net = data_dependent_blocks
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cal = Calibrator(
        net,
        jaxq.QuantConfig(w_bit=4, a_bit=8, quantize_first_last=True, keep_acc={"brecq": [True, 10]}),
        [torch.randn(4, 4) for _ in range(2)],
        progress=False,
    )
    with pytest.raises(Exception, match="DataDependent cannot run as a JAX function"):
        cal.run()
    after = net.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_default_bias_correction_is_applied_to_the_learned_weights():
    """Reconstruction learns without δ; the default bias correction is recomputed on the
    learned codes afterwards, not dropped."""
    net, data = _net_and_data()
    cal = Calibrator(
        net, jaxq.QuantConfig(w_bit=3, a_bit=8, keep_acc={"brecq": [True, 20]}), data, progress=False
    ).run()
    assert cal.cfg.bias_correction is True
    learned = [n for n, r in cal.records.items() if r.custom_codes]
    assert learned
    assert all(cal.records[n].bias_correction is not None for n in cal.records)
    q = cal.quantizers[learned[0]]
    np.testing.assert_array_equal(q.bias_correction.numpy(), cal.records[learned[0]].bias_correction)


def test_named_blocks_and_the_layers_outside_them_alone():
    from bridge.jax_model.block_reconstruction import BlockNameError, named_blocks

    net, _ = _net_and_data()
    layers = ["stem", "blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b", "blocks.2.a", "blocks.2.b", "head"]
    assert named_blocks(net, layers, ("blocks.0", "blocks.1")) == [
        "blocks.0",
        "blocks.1",
        "stem",
        "blocks.2.a",
        "blocks.2.b",
        "head",
    ]
    with pytest.raises(BlockNameError, match=r"recon_blocks\[0\]='block\.0' is not a module.*'blocks\.0'"):
        named_blocks(net, layers, ("block.0",))
    with pytest.raises(BlockNameError, match="overlap"):
        named_blocks(net, layers, ("blocks", "blocks.1"))
    with pytest.raises(BlockNameError, match="holds no quantized layer"):
        named_blocks(net, ["stem", "head"], ("blocks.0",))


def test_config_refuses_named_blocks_without_block_reconstruction():
    with pytest.raises(ValueError, match="recon_blocks"):
        jaxq.QuantConfig(recon_blocks=["encoder.layer.0"])
    assert jaxq.QuantConfig(recon_blocks=["a"], keep_acc={"qdrop": [True, 5]}).recon_blocks == ("a",)


@pytest.mark.slow
def test_a_user_names_the_blocks():
    net, data = _net_and_data()
    cfg = jaxq.QuantConfig(w_bit=3, a_bit=8, keep_acc={"brecq": [True, 10]}, recon_blocks=["blocks.0", "blocks.1"])
    cal = Calibrator(net, cfg, data, progress=False).run()
    assert [r.name for r in cal.reports["blocks"]] == ["blocks.0", "blocks.1", "blocks.2.a", "blocks.2.b"]


@pytest.mark.slow
def test_a_block_that_is_never_called_is_one_clear_error_and_the_model_is_restored():
    from bridge.inplace.fakequant import model_quantizers
    from bridge.jax_model.block_reconstruction import BlockNameError

    net, data = _net_and_data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = jaxq.QuantConfig(w_bit=3, a_bit=8, keep_acc={"brecq": [True, 10]}, recon_blocks=["blocks"])
    with pytest.raises(BlockNameError, match="never called.*name its items"):
        Calibrator(net, cfg, data, progress=False).run()
    assert not model_quantizers(net) and all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("start", [{"gptq": True}, {"adaround": [True, 20]}], ids=["gptq", "adaround"])
def test_blocks_start_from_the_codes_of_a_rounding_step_before_them(start):
    """One step barely moves the rounding: the learned codes are GPTQ's or AdaRound's (moved
    onto ⌊W/s⌋ or ⌈W/s⌉) rather than round to nearest's."""
    data = _net_and_data()[1]

    def run(keep_acc):
        cfg = jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False, keep_acc=keep_acc)
        return Calibrator(_net_and_data()[0], cfg, data, progress=False).run()

    first, both, alone = run(start), run({**start, "brecq": [True, 1]}), run({"brecq": [True, 1]})
    assert next(s for s in both.steps if s.step == "blocks")
    names = [n for n in first.records if n.startswith("blocks.")]
    same = lambda a, b: np.mean([np.mean(a.records[n].codes == b.records[n].codes) for n in names])  # noqa: E731
    assert same(both, first) > 0.95 and same(both, first) > same(alone, first)


def test_blocks_report_held_out_errors_and_keep_learned_codes_only_where_held_out_error_falls(monkeypatch):
    from jaxq import block_reconstruction as br

    splits = []
    real_split = br.holdout_split
    monkeypatch.setattr(br, "holdout_split", lambda *a: splits.append(a[1:]) or real_split(*a))
    net, data = _net_and_data()
    cfg = jaxq.QuantConfig(
        w_bit=3, a_bit=8, bias_correction=False, keep_acc={"brecq": [True, 40]}, recon_augment=1, recon_holdout=0.25
    )
    cal = Calibrator(net, cfg, data, progress=False).run()
    assert splits and all(s == (64, 32, 0.25, 0) for s in splits)  # 32 images, 32 copies, 0 synthetic
    for r in cal.reports["blocks"]:
        assert np.isfinite(r.held_before) and np.isfinite(r.held_after)
        assert r.kept == (r.held_after < r.held_before)
        assert r.kept_step in (0, 10, 20, 30, 40) and 0.0 <= r.hard_share <= 1.0
        layers = [n for n in r.layers if n in cal.records]
        assert r.kept or not any(cal.records[n].custom_codes for n in layers)
    off = Calibrator(  # the default: no image held out
        _net_and_data()[0],
        jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False, keep_acc={"brecq": [True, 40]}),
        data,
        progress=False,
    ).run()
    assert all(np.isnan(r.held_after) and r.kept_step == 40 for r in off.reports["blocks"])
    assert all(r.kept == (r.error_after < r.error_before) for r in off.reports["blocks"])


@pytest.mark.parametrize("bad", [-0.1, 0.6, True, "0.25"])
def test_recon_holdout_out_of_range_names_the_field(bad):
    with pytest.raises(ValueError, match=r"QuantConfig.recon_holdout=.* must be a number in \[0, 0.5\]"):
        jaxq.QuantConfig(recon_holdout=bad)


def test_recon_hard_final_ends_every_block_with_hard_rounding():
    net, data = _net_and_data()
    cfg = jaxq.QuantConfig(
        w_bit=3, a_bit=8, bias_correction=False, keep_acc={"brecq": [True, 40]}, recon_hard_final=0.25
    )
    cal = Calibrator(net, cfg, data, progress=False).run()
    assert cal.reports["blocks"] and all(float(r.hard_share) == 1.0 for r in cal.reports["blocks"])


@pytest.mark.parametrize("bad", [-0.1, 0.6, True, None])
def test_recon_hard_final_out_of_range_names_the_field(bad):
    with pytest.raises(ValueError, match=r"QuantConfig.recon_hard_final=.* must be a number in \[0, 0.5\]"):
        jaxq.QuantConfig(recon_hard_final=bad)


def test_recon_lr_is_the_rounding_learning_rate_of_every_block():
    """A larger `recon_lr` moves every `V` further in the same steps: more of the rounding
    ends hard (this fails if the field does not reach the blocks' optimiser)."""

    def hard_shares(lr):
        net, data = _net_and_data()
        cfg = jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False, keep_acc={"brecq": [True, 40]}, recon_lr=lr)
        return [float(r.hard_share) for r in Calibrator(net, cfg, data, progress=False).run().reports["blocks"]]

    slow, fast = hard_shares(0.001), hard_shares(0.5)
    assert slow and all(f > s for f, s in zip(fast, slow)), (slow, fast)


@pytest.mark.parametrize("bad", [0, -0.1, 11, True, "0.1", None])
def test_recon_lr_out_of_range_names_the_field(bad):
    with pytest.raises(ValueError, match=r"QuantConfig.recon_lr=.* must be a number in \(0, 10\]"):
        jaxq.QuantConfig(recon_lr=bad)


def test_recon_reg_reaches_every_block():
    """A large normalised regulariser weight hardens more of every block's rounding in the
    same steps than a tiny one (this fails if the field does not reach the blocks)."""

    def hard_shares(reg):
        net, data = _net_and_data()
        cfg = jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False, keep_acc={"brecq": [True, 40]}, recon_reg=reg)
        return [float(r.hard_share) for r in Calibrator(net, cfg, data, progress=False).run().reports["blocks"]]

    weak, strong = hard_shares(1e-3), hard_shares(1e4)
    assert weak and all(s > w for s, w in zip(strong, weak)), (weak, strong)


@pytest.mark.parametrize("bad", [-1.0, 2e6, True, "100", None])
def test_recon_reg_out_of_range_names_the_field(bad):
    with pytest.raises(ValueError, match=r"QuantConfig.recon_reg=.* must be a number in \[0, 1e6\]"):
        jaxq.QuantConfig(recon_reg=bad)


def test_a_memory_budget_below_a_blocks_program_takes_its_gradient_in_parts():
    """`memory_budget` bounds a block's training program: the default budget runs the
    whole mini-batch at once; 16 MiB, below these blocks' programs at 48 px (~18 MiB),
    halves it until it fits, and the blocks still learn."""
    data = [torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cfg = jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False, keep_acc={"brecq": [True, 30]})
    whole = Calibrator(_net_and_data()[0], cfg, data, progress=False).run().reports["blocks"]
    assert all(r.micro_batch == 0 and r.working_mib > 16 for r in whole)
    small = jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False, keep_acc={"brecq": [True, 30]}, memory_budget=16)
    parts = Calibrator(_net_and_data()[0], small, data, progress=False).run().reports["blocks"]
    assert all(1 <= r.micro_batch < 16 and r.working_mib <= 16 for r in parts)
    assert sum(r.error_after < r.error_before for r in parts) >= 2


_TWICE = """
import os, sys
sys.path.insert(0, {here!r})
import jaxq
from bridge import Calibrator
from test_block_reconstruction import _net_and_data
for run in range(2):
    net, data = _net_and_data()
    cfg = jaxq.QuantConfig(w_bit=3, a_bit=8, bias_correction=False, keep_acc={{"brecq": [True, 20]}})
    cal = Calibrator(net, cfg, data, progress=False).run()
    print("compiles", run, [r.compiles for r in cal.reports["blocks"]])
"""


@pytest.mark.slow
def test_equal_blocks_share_one_program_and_a_second_run_compiles_nothing(tmp_path):
    """In a fresh process with jaxq's compilation cache (the default for users): the three
    equal residual blocks compile one program, and calibrating again compiles nothing."""
    import ast
    import os
    import pathlib
    import subprocess
    import sys

    env = {**os.environ, "JAXQ_COMPILATION_CACHE": str(tmp_path / "cache")}
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(k, None)
    script = _TWICE.format(here=str(pathlib.Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split(" ", 2) for line in out.stdout.splitlines() if line.startswith("compiles")]
    first, second = (ast.literal_eval(counts) for _, _, counts in lines)
    assert first[0] >= 1 and first[1:] == [0, 0], first  # blocks 2 and 3 load block 1's program
    assert second == [0, 0, 0], second


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.proj(x)
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("key", ["qdrop", "pd_quant"])
def test_functional_layers_are_refused_by_their_full_names_and_the_model_restored(key, monkeypatch):
    def calibrated(*_a, **_k):
        raise AssertionError("the activation pass ran before the refusal")

    monkeypatch.setattr("bridge.pipeline.activation_qparams", calibrated)
    torch.manual_seed(0)
    net = _Attention().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = jaxq.QuantConfig(w_bit=4, a_bit=8, bias_correction=False, keep_acc={key: [True, 5]})
    cal = Calibrator(net, cfg, [torch.randn(4, 5, 8) for _ in range(2)], progress=False)
    with pytest.raises(Exception, match=r"'attn'.*disable_names=\['attn'"):
        cal.run()
    after = net.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
