"""Layer-by-layer decoder quantization (`bridge.llm.quantize_decoder`)."""

import copy

import numpy as np
import pytest
import torch

from bridge.llm import quantize_decoder
from bridge.llm import sequential as seq
from jaxq.groupwise import dequantize_codes
from jaxq.llm import LlmConfig
from jaxq.qparams import QParams
from jaxq.scheme import QScheme


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_records_are_the_weights_in_the_model(llama, tokens):
    r = quantize_decoder(llama, tokens, LlmConfig(method="gptq", group_size=64), batch_size=5, progress=False)
    assert len(r.records) == 2 * 7 and "lm_head" not in r.records
    for name, rec in r.records.items():
        assert rec.scale.shape == (rec.codes.shape[0], rec.codes.shape[1] // 64)
        assert rec.codes.min() >= -8 and rec.codes.max() <= 7
        w_hat = dequantize_codes(rec.codes, QParams(rec.scale, rec.offset, QScheme(4, axis=0)))
        np.testing.assert_array_equal(np.asarray(w_hat), llama.get_submodule(name).weight.detach().numpy())


def test_gptq_lowers_every_layers_output_error(llama, tokens):
    r = quantize_decoder(llama, tokens, LlmConfig(method="gptq", w_bit=3, group_size=64), progress=False)
    for name, (rtn, gptq) in r.errors.items():
        assert gptq < rtn, name


def test_the_result_does_not_depend_on_the_batch_size(llama, tokens):
    """The row sample AWQ's searches use draws one key per row from a stream per input
    group, so batching the calibration windows differently picks the same rows (GPTQ's
    `H` sums float32 products per batch, so with GPTQ a batch size may move a near-tie
    code; the streamed test below uses one batch size for both paths)."""
    cfg = LlmConfig(method="awq", group_size=64, awq_rows=100)  # fewer than the 384 tokens: a sample
    a, b = copy.deepcopy(llama), copy.deepcopy(llama)
    ra = quantize_decoder(a, tokens, cfg, batch_size=5, progress=False)
    rb = quantize_decoder(b, tokens, cfg, batch_size=16, progress=False)
    for name in ra.records:
        np.testing.assert_array_equal(ra.records[name].codes, rb.records[name].codes, err_msg=name)
        np.testing.assert_array_equal(ra.records[name].scale, rb.records[name].scale, err_msg=name)


def test_awq_folds_scales_without_changing_the_float_function(llama, tokens, monkeypatch):
    """With the codes step replaced by the identity, AWQ's folded model is the float model."""
    with torch.no_grad():
        llama.model.embed_tokens.weight[:, :3] *= 20  # outlier channels, where AWQ scales matter
    ref = _logits(llama, tokens)
    w_orig = {n: m.weight.detach().clone() for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear)}

    def float_codes(layer, names_h, cfg, use_gptq, ranges):
        out = {}
        for n in names_h:
            w = layer.get_submodule(n).weight.detach().numpy()
            out[n] = (
                w,
                QParams(np.ones((w.shape[0], 1), np.float32), np.zeros((w.shape[0], 1)), cfg.weight_scheme),
                (0, 0),
            )
        return out

    monkeypatch.setattr(seq, "_codes", float_codes)
    r = quantize_decoder(llama, tokens, LlmConfig(method="awq", group_size=64), progress=False)
    assert set(r.awq_scales) == {
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj")
    }
    q_proj = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(llama.get_submodule(q_proj).weight, w_orig[q_proj])  # scales were folded
    torch.testing.assert_close(_logits(llama, tokens), ref, rtol=1e-4, atol=1e-4)


def test_awq_skips_values_to_output_with_grouped_query_heads(tokens, make_llama):
    model = make_llama(kv_heads=2)
    r = quantize_decoder(model, tokens, LlmConfig(method="awq", group_size=64), progress=False)
    assert not any(k.endswith("v_proj") for k in r.awq_scales)
    assert any(k.endswith("input_layernorm") for k in r.awq_scales)


def test_dynamic_activations_quantize_every_token_on_its_own(llama, tokens):
    r = quantize_decoder(
        llama, tokens, LlmConfig(w_bit=8, group_size=None, a_bit=8, activations="dynamic"), progress=False
    )
    assert len(r.act_hooks) == 14 and all(rec.input_scale is None for rec in r.records.values())
    seen = {}
    lin = llama.get_submodule("model.layers.0.mlp.down_proj")
    h = lin.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    _logits(llama, tokens[:2])
    h.remove()
    x = seen["x"].reshape(-1, lin.in_features)
    amax = x.abs().amax(-1, keepdim=True)  # a token's largest value sits at code 127 or −128
    off_grid = [((x / (amax / c)) - torch.round(x / (amax / c))).abs().amax(-1) for c in (127, 128)]
    assert bool((torch.minimum(*off_grid) < 2e-3).all())  # every token on its own grid


def test_static_activation_scale_is_calibration_max(llama, tokens):
    r = quantize_decoder(llama, tokens, LlmConfig(method="rtn", a_bit=8, activations="static"), progress=False)
    scales = {n: rec.input_scale for n, rec in r.records.items()}
    assert scales["model.layers.0.self_attn.q_proj"] == scales["model.layers.0.self_attn.v_proj"] > 0


def test_a_failure_leaves_the_model_as_it_was(llama, tokens, monkeypatch):
    before = copy.deepcopy(llama.state_dict())
    calls = []

    def fail_on_second_layer(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*a, **k)

    real = seq._codes
    monkeypatch.setattr(seq, "_codes", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_decoder(
            llama, tokens, LlmConfig(method="rtn", rotate=True, a_bit=8, activations="dynamic"), progress=False
        )
    for k, v in llama.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m._forward_pre_hooks for m in llama.modules())


def test_bad_input_is_named(llama, tokens):
    with pytest.raises(ValueError, match="token ids"):
        quantize_decoder(llama, tokens.float(), progress=False)
    with pytest.raises(ValueError, match="ignore names no Linear layer.*'model.layers.0.attn'"):
        quantize_decoder(llama, tokens, LlmConfig(ignore=("model.layers.0.attn",)), progress=False)
    with pytest.raises(TypeError, match="not a decoder language model in the Llama layout"):
        quantize_decoder(torch.nn.Linear(4, 4), tokens, progress=False)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_decoder(llama, tokens, LlmConfig(group_size=96), progress=False)


def test_ignored_layers_stay_float(llama, tokens):
    name = "model.layers.1.mlp.down_proj"
    w = llama.get_submodule(name).weight.detach().clone()
    r = quantize_decoder(llama, tokens, LlmConfig(method="awq", ignore=(name,)), progress=False)
    assert name not in r.records and "model.layers.1.mlp.up_proj" not in r.awq_scales
    assert torch.equal(llama.get_submodule(name).weight, w)
