"""The embedded tiny Llama (`bridge.models.tiny_llama`) quantized layer by layer, with
thresholds on held-out perplexity (`benchmarks/llm.py` has the full table)."""

import copy

import pytest
import torch

from bridge.llm import quantize_decoder
from bridge.models import tiny_llama
from jaxq.llm import LlmConfig

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_llama.load_tiny_llama()
    held_out = tiny_llama.eval_windows(32)
    return model, tiny_llama.calibration_windows(64), held_out, tiny_llama.perplexity(model, held_out)


def _ppl(setup, cfg):
    model, calib, held_out, _ = setup
    q = copy.deepcopy(model)
    quantize_decoder(q, calib, cfg, progress=False)
    return tiny_llama.perplexity(q, held_out)


def test_the_shipped_model_is_trained(setup):
    assert setup[3] < 5.0  # bytes of held-out Python source; a random model is at ~256


def test_gptq_w3_g128_keeps_at_most_half_of_round_to_nearest_loss(setup):
    fp = setup[3]
    rtn = _ppl(setup, LlmConfig(method="rtn", w_bit=3))
    gptq = _ppl(setup, LlmConfig(method="gptq", w_bit=3))
    assert gptq - fp <= 0.5 * (rtn - fp), (fp, rtn, gptq)


def test_rotation_lowers_w4a4_dynamic_perplexity(setup):
    w4a4 = dict(method="rtn", w_bit=4, group_size=None, a_bit=4, activations="dynamic")
    assert _ppl(setup, LlmConfig(rotate=True, **w4a4)) < _ppl(setup, LlmConfig(**w4a4))
