"""msModelSlim's layout for decoders (`bridge.export.msmodelslim_llm`)."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from bridge.export.files import ExportError
from bridge.export.msmodelslim_llm import export_msmodelslim
from bridge.llm import quantize_decoder
from jaxq.llm import LlmConfig

transformers = pytest.importorskip("transformers")


TOKENS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "cfg, kind",
    [
        (LlmConfig(method="gptq", group_size=64), "W4A16"),
        (LlmConfig(method="rtn", w_bit=8, group_size=None, a_bit=8, activations="static"), "W8A8"),
        (LlmConfig(method="rtn", w_bit=8, group_size=None, a_bit=8, activations="dynamic"), "W8A8_DYNAMIC"),
    ],
)
def test_files_hold_the_quantized_model(tmp_path, cfg, kind, make_llama):
    model = make_llama(layers=1)
    r = quantize_decoder(model, TOKENS, cfg, progress=False)
    st, js = export_msmodelslim(r, tmp_path / "out")
    assert st.name == f"quant_model_weight_{kind.lower()}.safetensors"
    desc, tensors = json.loads(js.read_text()), load_file(st)
    assert desc["model_quant_type"] == kind and desc["model.norm.weight"] == "FLOAT"
    name = "model.layers.0.mlp.down_proj"
    assert desc[f"{name}.weight"] == kind and tensors[f"{name}.weight"].dtype == np.int8
    w = model.get_submodule(name).weight.detach().numpy()
    if kind == "W8A8":
        s_x = r.records[name].input_scale
        np.testing.assert_allclose(tensors[f"{name}.deq_scale"], s_x * r.records[name].scale.reshape(-1), rtol=1e-6)
        assert not tensors[f"{name}.quant_bias"].any()  # no bias, symmetric inputs
    else:
        scale, offset = tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_offset"]
        g = w.shape[1] // scale.shape[1]
        w_hat = (tensors[f"{name}.weight"] - np.repeat(offset, g, 1)) * np.repeat(scale, g, 1)
        np.testing.assert_array_equal(w_hat.astype(np.float32), w)


def test_types_the_layout_lacks_are_refused(tmp_path, make_llama):
    r = quantize_decoder(make_llama(layers=1), TOKENS, LlmConfig(method="rtn", w_bit=3), progress=False)
    with pytest.raises(ExportError, match="no type for W3A16 g128 rtn"):
        export_msmodelslim(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()
