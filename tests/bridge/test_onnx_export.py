import numpy as np
import pytest
import torch

from bridge import Calibrator, ExportError
from jaxq import QuantConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def test_qdq_onnx_runs_and_matches_fake_quant(digits, digits_model, digits_calib, tmp_path):
    cal = Calibrator(digits_model, QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True),
                     digits_calib, progress=False).run()
    (path,) = cal.export_quant_onnx("digits", tmp_path, input_names=["image"])
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    # activations: QuantizeLinear + DequantizeLinear; weights: int8 initializers + DequantizeLinear
    assert ops.count("QuantizeLinear") == 5 and ops.count("DequantizeLinear") == 2 * 5
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8) == 5
    assert {"Conv", "Gemm"} <= set(ops)
    x = digits[2][:64]  # held-out digits, another batch size than the traced one
    y = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
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
