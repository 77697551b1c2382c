"""msModelSlim's Ascend ONNX form, rewritten from the QDQ export.

Every quantized `Conv` / `Gemm` / `MatMul` of the QDQ graph

    x → QuantizeLinear → DequantizeLinear ─┐
    W_q (int8) → DequantizeLinear ─────────┼→ Conv/Gemm/MatMul (+ float bias) → y

becomes the integer form Ascend's ATC compiles:

    x → AscendQuant(scale = 1/s_x, offset = o8) → int8 ─┐
    W_q (int8) ─────────────────────────────────────────┼→ Conv/Gemm/MatMul (+ int32 quant_bias)
                                                        └→ AscendDequant(deq_scale) → y

with `o8` the int8 code of 0, `quant_bias = round(b/deq − o8·Σ W_q)` and `deq_scale`
(`s_x·s_w`) stored as uint64 holding the float32 bits, as msModelSlim writes it. No
Ascend runtime is available here, so the form is checked structurally (tests).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bridge.export.graph import constant_values, prune_dead_nodes
from bridge.export.w8a8 import activation_shift, integer_bias

ASCEND_DOMAIN = "ascend"
_COMPUTE = ("Conv", "Gemm", "MatMul")


def deq_scale_bits(deq: np.ndarray) -> np.ndarray:
    """float32 deq_scale → uint64 words holding its bit pattern (msModelSlim's encoding)."""
    return deq.astype(np.float32).view(np.uint32).astype(np.uint64)


def to_ascend(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite a QDQ model (from `export_qdq`) into the Ascend form; returns a new model."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consts = constant_values(graph)
    new_nodes, replaced = [], 0
    for node in graph.node:
        rewrite = _match(node, producer, inits, consts) if node.op_type in _COMPUTE else None
        if rewrite is None:
            new_nodes.append(node)
            continue
        new_nodes.extend(_rewrite(node, rewrite, graph, replaced))
        replaced += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    prune_dead_nodes(graph)  # the replaced QDQ pairs
    model.opset_import.append(helper.make_opsetid(ASCEND_DOMAIN, 1))
    return model


def _match(node, producer, inits, consts):
    """The pieces of a quantized compute node, or None if it is not one.

    Between the activation's DequantizeLinear and the node a constant-mode `Pad` may sit
    (EfficientNet's static same padding); between the weight's DequantizeLinear and a
    `MatMul` a `Transpose` (torch's Linear as exported). Both are carried over: the
    integer Pad fills with `o8`, the code of 0.0; the Transpose is applied to `W_q`.
    """
    if len(node.input) < 2:
        return None
    dq_x, pad = producer.get(node.input[0]), None
    if dq_x is not None and dq_x.op_type == "Pad" and _constant_pad(dq_x, consts):
        pad, dq_x = dq_x, producer.get(dq_x.input[0])
    dq_w, perm = producer.get(node.input[1]), None
    if dq_w is not None and dq_w.op_type == "Transpose":
        perm = next((list(a.ints) for a in dq_w.attribute if a.name == "perm"), None)
        dq_w = producer.get(dq_w.input[0])
    if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
        return None
    q_x = producer.get(dq_x.input[0])
    if q_x is None or q_x.op_type != "QuantizeLinear" or dq_w.input[0] not in inits:
        return None
    s_x, z_x = consts.get(q_x.input[1]), consts.get(q_x.input[2])
    w_q, s_w = consts.get(dq_w.input[0]), consts.get(dq_w.input[1])
    if s_x is None or z_x is None or w_q is None or s_w is None or w_q.dtype != np.int8:
        return None
    if perm is not None:
        w_q = np.transpose(w_q, perm if perm else None)
    bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    out_axis = 1 if node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b) else 0
    return dict(
        x=q_x.input[0],
        s_x=float(s_x),
        z_x=int(z_x),
        signed=z_x.dtype == np.int8,
        w_q=np.ascontiguousarray(w_q),
        s_w=s_w.astype(np.float32),
        bias=bias,
        out_axis=out_axis,
        pad=pad,
    )


def _constant_pad(node, consts) -> bool:
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    value = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    return (
        mode == b"constant"
        and value is not None
        and float(np.asarray(value).reshape(-1)[0] if np.size(value) else 0.0) == 0.0
    )


def _rewrite(node, m, graph, index):
    name = f"ascend_{index}"
    o8 = m["z_x"] - activation_shift(m["signed"])
    w_q, out_axis = m["w_q"], m["out_axis"]
    deq = (np.float32(m["s_x"]) * m["s_w"]).astype(np.float32)
    deq = np.broadcast_to(deq, (w_q.shape[out_axis],)).astype(np.float32)
    w2 = np.moveaxis(w_q.astype(np.int64), out_axis, 0).reshape(w_q.shape[out_axis], -1)
    quant_bias, deq = integer_bias(node.name or name, m["bias"], deq, w2, o8)
    graph.initializer.extend(
        [
            numpy_helper.from_array(w_q, f"{name}.weight"),
            numpy_helper.from_array(quant_bias, f"{name}.quant_bias"),
            numpy_helper.from_array(deq_scale_bits(deq), f"{name}.deq_scale"),
        ]
    )
    quant = helper.make_node(
        "AscendQuant",
        [m["x"]],
        [f"{name}.x_int8"],
        name=f"{name}.quant",
        domain=ASCEND_DOMAIN,
        scale=float(np.float32(1.0) / np.float32(m["s_x"])),
        offset=float(o8),
        sqrt_mode=0,
        round_mode="Round",
        dst_type=2,
    )
    x_int8, pad_nodes = f"{name}.x_int8", []
    if m["pad"] is not None:  # pad the int8 tensor with the code of 0.0
        graph.initializer.append(numpy_helper.from_array(np.array(o8, np.int8), f"{name}.pad_value"))
        pads = list(m["pad"].input[1:2]) + [f"{name}.pad_value"] + list(m["pad"].input[3:4])
        pad_nodes = [
            helper.make_node("Pad", [x_int8, *pads], [f"{name}.x_int8_padded"], name=f"{name}.pad", mode="constant")
        ]
        x_int8 = f"{name}.x_int8_padded"
    inputs = [x_int8, f"{name}.weight"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        compute = helper.make_node("MatMul", inputs, [f"{name}.acc"], name=f"{name}.matmul")
        extra = [helper.make_node("Add", [f"{name}.acc", f"{name}.quant_bias"], [f"{name}.acc_b"], name=f"{name}.bias")]
        acc = f"{name}.acc_b"
    else:
        compute = helper.make_node(
            node.op_type, inputs + [f"{name}.quant_bias"], [f"{name}.acc"], name=f"{name}.int", **attrs
        )
        extra, acc = [], f"{name}.acc"
    dequant = helper.make_node(
        "AscendDequant",
        [acc, f"{name}.deq_scale"],
        list(node.output),
        name=f"{name}.dequant",
        domain=ASCEND_DOMAIN,
        sqrt_mode=0,
        relu_flag=0,
        dtype=0,
    )
    return [quant, *pad_nodes, compute, *extra, dequant]
