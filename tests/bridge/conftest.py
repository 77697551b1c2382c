"""Fixtures shared by the bridge's decoder tests (`llm/`, `export/`)."""

import pytest
import torch


def small_llama(kv_heads: int = 4, seed: int = 0, layers: int = 2):
    """A random Llama (hidden 128, MLP 256, vocabulary 64) with weights far from initialisation."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def make_llama():
    return small_llama
