"""Layer-by-layer quantization of a checkpoint on disk (`bridge.llm.checkpoint`)."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from bridge.cli.main import main
from bridge.llm import checkpoint as ckpt
from bridge.llm import quantize_decoder
from bridge.llm.checkpoint import quantize_llm_checkpoint
from bridge.weights_only.safetensors_io import CheckpointError
from jaxq.llm import LlmConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

CFG = LlmConfig(method="awq+gptq", group_size=64, a_bit=8, activations="dynamic")


@pytest.fixture
def source(tmp_path, llama):
    llama.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_streamed_checkpoint_equals_the_in_memory_result(source, llama, tokens, tmp_path):
    in_memory = copy.deepcopy(llama)
    quantize_decoder(in_memory, tokens, CFG, batch_size=5, progress=False)
    report = quantize_llm_checkpoint(source, tmp_path / "out", tokens, CFG, batch_size=5, progress=False)
    assert report["layers"] == 2 and report["resumed_from"] == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "model-layer-00000.safetensors", "model-layer-00001.safetensors",
                     "model-rest.safetensors", "model.safetensors.index.json"]  # fmt: skip
    torch.testing.assert_close(_logits(_load(tmp_path / "out"), tokens), _logits(in_memory, tokens), rtol=0, atol=0)


def test_an_interrupted_run_resumes_after_the_last_finished_layer(source, tokens, tmp_path, monkeypatch):
    real = ckpt._quantize_layer
    calls = []

    def fail_on_layer_1(layer, prefix, *a):
        calls.append(prefix)
        if prefix == "model.layers.1" and len(calls) == 2:
            raise KeyboardInterrupt
        return real(layer, prefix, *a)

    monkeypatch.setattr(ckpt, "_quantize_layer", fail_on_layer_1)
    with pytest.raises(KeyboardInterrupt):
        quantize_llm_checkpoint(source, tmp_path / "out", tokens, CFG, progress=False)
    assert (tmp_path / "out" / "model-layer-00000.safetensors").exists()
    assert not (tmp_path / "out" / "model-layer-00001.safetensors").exists()
    report = quantize_llm_checkpoint(source, tmp_path / "out", tokens, CFG, progress=False)
    assert report["resumed_from"] == 1 and calls == ["model.layers.0", "model.layers.1", "model.layers.1"]
    fresh = quantize_llm_checkpoint(source, tmp_path / "fresh", tokens, CFG, progress=False)
    assert fresh["resumed_from"] == 0
    torch.testing.assert_close(_logits(_load(tmp_path / "out"), tokens), _logits(_load(tmp_path / "fresh"), tokens))


def test_a_source_rewritten_in_place_is_quantized_again(source, tokens, tmp_path, monkeypatch, make_llama):
    real = ckpt._quantize_layer

    def stop_after_layer_0(layer, prefix, *a):
        if prefix == "model.layers.1":
            raise KeyboardInterrupt
        return real(layer, prefix, *a)

    monkeypatch.setattr(ckpt, "_quantize_layer", stop_after_layer_0)
    with pytest.raises(KeyboardInterrupt):
        quantize_llm_checkpoint(source, tmp_path / "out", tokens, CFG, progress=False)
    monkeypatch.setattr(ckpt, "_quantize_layer", real)
    make_llama(seed=7).save_pretrained(source)  # same names and shapes, other values
    assert quantize_llm_checkpoint(source, tmp_path / "out", tokens, CFG, progress=False)["resumed_from"] == 0


def test_refusals_name_the_problem(source, tokens, tmp_path):
    with pytest.raises(ValueError, match="memory_budget=1 MiB is below what the run needs: .*runtime 900"):
        quantize_llm_checkpoint(source, tmp_path / "out", tokens, CFG, memory_budget_mib=1, progress=False)
    with pytest.raises(ValueError, match="rotate needs the whole model"):
        quantize_llm_checkpoint(source, tmp_path / "out", tokens, LlmConfig(rotate=True), progress=False)
    quantize_llm_checkpoint(source, tmp_path / "out", tokens, LlmConfig(method="rtn"), progress=False)
    with pytest.raises(CheckpointError, match="already holds a quantized checkpoint"):
        quantize_llm_checkpoint(source, tmp_path / "out", tokens, LlmConfig(method="rtn"), progress=False)


def test_cli(source, tokens, tmp_path, capsys):
    np.save(tmp_path / "calib.npy", tokens.numpy())
    argv = ["quantize-llm", str(source), "--out", str(tmp_path / "out"), "--calib", str(tmp_path / "calib.npy")]
    assert main([*argv, "--bits", "3", "--group-size", "64", "--method", "rtn", "--no-progress"]) == 0
    assert "2 decoder layers quantized (W3A16 g64 rtn); written to" in capsys.readouterr().out
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    np.save(tmp_path / "bad.npy", tokens.numpy().astype(np.float32))
    assert main(["quantize-llm", str(source), "--out", str(tmp_path / "o2"), "--calib", str(tmp_path / "bad.npy")]) == 2
    assert "token ids [samples, sequence] of non-negative integers expected, got float32" in capsys.readouterr().err
