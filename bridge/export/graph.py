"""Constant folding and dead-node pruning on ONNX graphs (shared by the QDQ and Ascend exports)."""

from __future__ import annotations

import numpy as np
import onnx


def constant_values(graph: "onnx.GraphProto") -> dict[str, np.ndarray]:
    """Values of every initializer and of every node computed from constants alone, by name.

    The exporter emits scales and zero points through `Constant`/`Cast` nodes, and a weight
    given as integer codes (SQuant/AdaRound) as `(q − o)·s` through `Reshape`/`Concat`/`Sub`/
    `Mul`; those are evaluated here (numpy, the graph's dtypes) so both fold to constants.
    """
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            values[node.output[0]] = _constant(node.attribute[0])
        elif node.op_type in _CONSTANT_OPS and node.input and all(i in values for i in node.input):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            values[node.output[0]] = _CONSTANT_OPS[node.op_type]([values[i] for i in node.input], attrs)
    return values


def _constant(attr: "onnx.AttributeProto") -> np.ndarray:
    """The value of a `Constant` node (`value`, `value_int(s)`, `value_float(s)`)."""
    from onnx import numpy_helper

    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    dtype = np.int64 if attr.name.startswith("value_int") else np.float32
    return np.asarray(onnx.helper.get_attribute_value(attr), dtype=dtype)


def _reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """ONNX Reshape (allowzero = 0: a 0 copies the input's dimension)."""
    dims = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape.tolist())]
    return x.reshape(dims)


_CONSTANT_OPS = {
    "Cast": lambda xs, a: xs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"])),
    "Reshape": lambda xs, a: _reshape(xs[0], xs[1]),
    "Concat": lambda xs, a: np.concatenate(xs, axis=a.get("axis", 0)),
    "Add": lambda xs, a: np.add(xs[0], xs[1], dtype=np.result_type(xs[0], xs[1])),
    "Sub": lambda xs, a: np.subtract(xs[0], xs[1], dtype=np.result_type(xs[0], xs[1])),
    "Mul": lambda xs, a: np.multiply(xs[0], xs[1], dtype=np.result_type(xs[0], xs[1])),
}


def prune_dead_nodes(graph: "onnx.GraphProto") -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for i in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(i)
