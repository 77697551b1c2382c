"""QuaRot-style rotation (`bridge.llm.rotation`): the float function is unchanged."""

import pytest
import torch

from bridge.llm.rotation import rotate_decoder


@pytest.mark.parametrize("kv_heads, online", [(4, True), (2, True), (4, False)])
def test_rotated_model_computes_the_same_logits(tokens, kv_heads, online, make_llama):
    model = make_llama(kv_heads=kv_heads)
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    handles = rotate_decoder(model, seed=1, online=online)
    assert len(handles) == (2 if online else 0)
    with torch.no_grad():
        out = model(input_ids=tokens).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(128)) for layer in model.model.layers)


def test_rotation_spreads_an_outlier_channel(llama):
    with torch.no_grad():
        llama.model.embed_tokens.weight[:, 7] *= 50
    rotate_decoder(llama, seed=0)
    e = llama.model.embed_tokens.weight.detach()
    assert float(e.abs().amax(0).max() / e.abs().amax(0).median()) < 3  # no channel dominates


def test_tied_embeddings_are_refused(llama):
    llama.lm_head.weight = llama.model.embed_tokens.weight
    llama.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        rotate_decoder(llama)
