import numpy as np
import pytest
import torch
from torch import nn

from bridge import Calibrator, ExportError
from jaxq import QuantConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from bridge.export.onnx import onnx_session  # noqa: E402


@pytest.mark.parametrize("bias_correction", [False, True])
def test_qdq_onnx_runs_and_matches_fake_quant(digits, digits_model, digits_calib, tmp_path, bias_correction):
    cfg = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, bias_correction=bias_correction)
    cal = Calibrator(digits_model, cfg, digits_calib, progress=False).run()
    (path,) = cal.export_quant_onnx("digits", tmp_path, input_names=["image"])
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    # activations: QuantizeLinear + DequantizeLinear; weights: int8 initializers + DequantizeLinear
    assert ops.count("QuantizeLinear") == 5 and ops.count("DequantizeLinear") == 2 * 5
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8) == 5
    assert {"Conv", "Gemm"} <= set(ops)
    x = digits[2][:64]  # held-out digits, another batch size than the traced one
    y = onnx_session(path).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = cal.model(x).numpy()
    # ONNX rounds x/s where torch rounds x·(1/s): rare one-step flips, nothing more
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_onnx_bad_names(digits_model, digits_calib, tmp_path):
    cal = Calibrator(digits_model, QuantConfig(quant_mode=1, act_method=1), digits_calib, progress=False).run()
    with pytest.raises(ExportError, match="input_names"):
        cal.export_quant_onnx("m", tmp_path, input_names=["a", "b"])
    with pytest.raises(ExportError, match="plain name"):
        cal.export_quant_onnx("a/b", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_onnx_needs_8_bit(digits_model, digits_calib, tmp_path):
    cal = Calibrator(digits_model, QuantConfig(quant_mode=1, act_method=1, w_bit=4), digits_calib, progress=False).run()
    with pytest.raises(ExportError, match="w_bit=4"):
        cal.export_quant_onnx("m", tmp_path)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_ascend_form_structure_matches_the_w8a8_integer_path(digits_model, digits_calib, tmp_path, bias_correction):
    from safetensors.numpy import load_file

    cfg = QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, bias_correction=bias_correction)
    cal = Calibrator(digits_model, cfg, digits_calib, progress=False).run()
    (path,) = cal.export_quant_onnx("digits_ascend", tmp_path / "onnx", ascend=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("AscendQuant") == ops.count("AscendDequant") == 5
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    cal.export_quant_safetensor(tmp_path / "w8a8")
    ref = load_file(str(tmp_path / "w8a8" / "quant_model_weight_w8a8.safetensors"))
    layers = ["features.0", "features.3", "features.7", "classifier.1", "classifier.3"]  # graph order
    quant_nodes = [n for n in model.graph.node if n.op_type == "AscendQuant"]
    for i, layer in enumerate(layers):
        w, qb, deq = inits[f"ascend_{i}.weight"], inits[f"ascend_{i}.quant_bias"], inits[f"ascend_{i}.deq_scale"]
        assert w.dtype == np.int8 and qb.dtype == np.int32 and deq.dtype == np.uint64
        np.testing.assert_array_equal(w, ref[f"{layer}.weight"])
        np.testing.assert_array_equal(qb, ref[f"{layer}.quant_bias"])
        np.testing.assert_array_equal(deq.astype(np.uint32).view(np.float32), ref[f"{layer}.deq_scale"])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in quant_nodes[i].attribute}
        assert attrs["offset"] == float(ref[f"{layer}.input_offset"][0])
        np.testing.assert_allclose(attrs["scale"], 1.0 / float(ref[f"{layer}.input_scale"][0]), rtol=1e-6)


EXPORTS = {
    "params": lambda cal, path: cal.export_param(path, legacy=True),
    "w8a8": lambda cal, path: cal.export_quant_safetensor(path),
    "onnx": lambda cal, path: cal.export_quant_onnx("m", path),
    "ascend": lambda cal, path: cal.export_quant_onnx("m", path, ascend=True),
}


@pytest.fixture(scope="module")
def calibrated_digits():
    from bridge.models.digits import digits_split, load_digits_cnn

    x = digits_split()[0]
    return Calibrator(
        load_digits_cnn(),
        QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True),
        [x[i : i + 32] for i in range(0, 128, 32)],
        progress=False,
    ).run()


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_every_export_is_deterministic(calibrated_digits, kind, tmp_path):
    a = EXPORTS[kind](calibrated_digits, tmp_path / "a")
    b = EXPORTS[kind](calibrated_digits, tmp_path / "b")
    for fa, fb in zip(a, b):
        assert fa.read_bytes() == fb.read_bytes(), fa.name


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_every_export_fails_cleanly_on_a_bad_target(calibrated_digits, kind, tmp_path, monkeypatch):
    from bridge.export import files as export_mod

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot create export directory"):
        EXPORTS[kind](calibrated_digits, blocker / "sub")  # missing, and cannot be created
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(export_mod.os, "access", lambda *a, **k: False)  # read-only (root ignores chmod)
    with pytest.raises(ExportError, match="not writable"):
        EXPORTS[kind](calibrated_digits, ro)
    assert list(ro.iterdir()) == [] and blocker.read_text() == "x"


def test_qdq_onnx_stores_the_squant_codes_as_int8_weights(digits, digits_model, digits_calib, tmp_path):
    """With rounding codes (SQuant/AdaRound) the weight `(q − o)·s` folds back to the codes:
    every quantized layer's DequantizeLinear reads them as an int8 initializer, and neither
    the int32 codes nor the arithmetic that dequantized them stays in the graph."""
    from onnx import numpy_helper

    cal = Calibrator(
        digits_model,
        QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, keep_acc={"round_opt": True}),
        digits_calib,
        progress=False,
    ).run()
    (path,) = cal.export_quant_onnx("digits", tmp_path, input_names=["image"])
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert not [n for n in inits if n.endswith(".weight_codes")]
    assert not [n for n in graph.node if n.op_type in ("Sub", "Mul")]
    dq_weights = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert all(w.dtype == np.int8 for w in dq_weights)
    codes = cal.get_quant_params()[4]
    assert len(dq_weights) == len(codes) == 5
    for name, q in codes.items():
        assert sum(w.shape == q.shape and np.array_equal(w, q.astype(np.int8)) for w in dq_weights) == 1, name
    x = digits[2][:64]
    y = onnx_session(path).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = cal.model(x).numpy()
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_dict_outputs_keep_their_names(tmp_path):
    import onnx as onnx_lib

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.prob, self.box = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return {"prob": self.prob(h), "box": self.box(h)}

    cal = Calibrator(
        Heads().eval(),
        QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True),
        [torch.randn(3, 4)],
        progress=False,
    ).run()
    (path,) = cal.export_quant_onnx("heads", tmp_path)
    assert [o.name for o in onnx_lib.load(str(path)).graph.output] == ["prob", "box"]


def test_wrong_example_batch_is_one_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    cal = Calibrator(
        model, QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True), [torch.randn(3, 4)], progress=False
    ).run()
    with pytest.raises(ExportError, match=r"example batch \(input shapes \[\(3, 5\)\]\)") as info:
        cal.export_quant_onnx("m", tmp_path, example_batch=torch.randn(3, 5))
    assert len(str(info.value).splitlines()) == 1 and not list(tmp_path.iterdir())
