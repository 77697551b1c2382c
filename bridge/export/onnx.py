"""ONNX QDQ export of a fake-quant model (QuantizeLinear/DequantizeLinear pairs).

Uses torch's dynamo-based exporter (`torch.export` → onnxscript's torchlib, which maps
`fake_quantize_per_tensor_affine` / `_per_channel_affine` to QDQ pairs). torch ships no
fake-tensor kernels for the fake-quantize ops that export traces through, so
`register_fake_quant_kernels` adds them (shape-only: the output is `x`-shaped, the mask
bool). The TorchScript exporter is not used: it traces transformers 5 models
unfaithfully even in float.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bridge.capture.data import Batch
from bridge.export.files import ExportError, atomic_directory
from bridge.export.graph import constant_values, prune_dead_nodes

_CACHEMASK_OPS = (
    "fake_quantize_per_tensor_affine_cachemask",
    "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "fake_quantize_per_channel_affine_cachemask",
)


@functools.lru_cache(maxsize=None)
def register_fake_quant_kernels() -> None:
    """Give torch.export shape rules for the fake-quantize ops (once per process)."""
    for op in _CACHEMASK_OPS:
        try:
            torch.library.register_fake(f"aten::{op}")(
                lambda x, *args, **kwargs: (torch.empty_like(x), torch.empty_like(x, dtype=torch.bool))
            )
        except RuntimeError:  # a future torch that has one already
            pass


class _KeywordAdapter(nn.Module):
    """Positional inputs → the model's keyword inputs; structured outputs → a tuple."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)))
        return out.to_tuple() if hasattr(out, "to_tuple") else out


def _shapes(batch: Batch) -> str:
    shapes = [tuple(a.shape) for a in batch.args if isinstance(a, torch.Tensor)]
    shapes += [f"{k}={tuple(v.shape)}" for k, v in batch.kwargs.items() if isinstance(v, torch.Tensor)]
    return f"input shapes {shapes}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _dict_output_names(model: nn.Module, batch: Batch) -> list[str] | None:
    """The keys of a model that returns a dict of tensors (else None: the exporter's names)."""
    try:
        with torch.no_grad():
            out = model(*batch.args, **batch.kwargs)
    except Exception as e:  # the user's model rejected the batch: say which
        raise ExportError(
            f"the model rejected the example batch ({_shapes(batch)}): {type(e).__name__}: "
            f"{_first_line(e)}; give example_batch= a batch the model accepts"
        ) from e
    if hasattr(out, "keys") and all(isinstance(v, torch.Tensor) for v in out.values()):
        return [str(k) for k in out.keys()]
    return None


def export_qdq(
    model: nn.Module,
    batch: Batch,
    model_arch: str,
    save_path,
    input_names=None,
    output_names=None,
    opset_version: int = 18,
    dynamic_axes: dict[int, str] | None = None,
    ascend: bool = False,
    model_id: str | None = None,
) -> list[Path]:
    """Trace `model` on `batch` and write `<save_path>/<model_arch>.onnx` atomically.

    `dynamic_axes` maps axis → name for every input (default: axis 0 "batch"; keyword
    inputs of rank 2, token ids, also axis 1 "sequence").
    """
    if not model_arch or "/" in model_arch:
        raise ExportError(f"model_arch={model_arch!r} must be a plain name (it names the .onnx file)")
    if batch.kwargs:
        names = list(batch.kwargs)
        module, args = _KeywordAdapter(model, names), tuple(batch.kwargs.values())
    else:
        names = [f"input_{i}" for i in range(len(batch.args))]
        module, args = model, tuple(batch.args)
    input_names = list(input_names or names)
    if len(input_names) != len(args):
        raise ExportError(f"input_names={input_names!r} has {len(input_names)} names for {len(args)} model inputs")
    shapes = _dynamic_shapes(args, batch, dynamic_axes)
    if output_names is None:
        output_names = _dict_output_names(model, batch)
    register_fake_quant_kernels()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset_version,
                dynamic_shapes=(shapes,) if batch.kwargs else shapes,
                optimize=False,
                verbose=False,
            )
        except Exception as e:  # torch.export's errors run to pages; the cause is chained
            raise ExportError(
                f"torch's exporter could not trace the model on the example batch ({_shapes(batch)}): "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e
    proto = fold_weight_quantizers(program.model_proto)
    if ascend:
        from bridge.export.ascend import to_ascend

        proto = to_ascend(proto)
    with atomic_directory(save_path, "onnx", model_id) as staging:
        onnx.save(proto, str(staging / f"{model_arch}.onnx"))
    return [Path(save_path) / f"{model_arch}.onnx"]


def _dynamic_shapes(args: tuple, batch: Batch, dynamic_axes: dict[int, str] | None) -> tuple:
    """Per input, its dynamic axes as `torch.export.Dim`s (default: axis 0 "batch"; keyword
    inputs of rank 2, token ids, also axis 1 "sequence")."""
    shapes = []
    for a in args:
        axes = dynamic_axes or ({0: "batch", 1: "sequence"} if batch.kwargs and a.dim() == 2 else {0: "batch"})
        shapes.append({ax: torch.export.Dim(f"{n}") for ax, n in axes.items() if ax < a.dim()})
    return tuple(shapes)


def fold_weight_quantizers(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Replace every `QuantizeLinear(constant W)` by the integer codes jaxq computed
    (for SQuant/AdaRound codes, W = (q − o)·s folds back to exactly q).

    ONNX quantizes with `round(W / s)`; torch and jaxq round `W · (1/s)`. On weights the
    rare one-step disagreements are systematic (a flipped weight shifts every output of
    its channel), so weights are stored as int8/uint8 initializers feeding
    DequantizeLinear — the usual QDQ layout — computed here the torch way:
    `q = clamp(round(W · (1/s)) + z, qmin, qmax)` in float32.
    """
    from onnx import numpy_helper

    graph = model.graph
    values = constant_values(graph)
    keep = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            keep.append(node)
            continue
        w, scale, zero = (values.get(n) for n in node.input[:3])
        if w is None or scale is None or zero is None:
            keep.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim == 1 and w.ndim > 0:
            shape[axis % w.ndim] = -1
        inv = (np.float32(1.0) / scale.astype(np.float32)).reshape(shape)
        info = np.iinfo(zero.dtype)
        q = np.clip(np.round(w.astype(np.float32) * inv) + zero.astype(np.float32).reshape(shape), info.min, info.max)
        graph.initializer.append(numpy_helper.from_array(q.astype(zero.dtype), node.output[0]))
    del graph.node[:]
    graph.node.extend(keep)
    prune_dead_nodes(graph)  # the float weights (or codes and their `(q − o)·s`) now folded
    return model


def onnx_session(path, **options):
    """An onnxruntime session that runs the exported QDQ graph as written
    (DequantizeLinear → float op → QuantizeLinear), for checking it against the torch model.

    onnxruntime's default optimizer fuses QDQ into its integer kernels (QLinearConv,
    QGemm). On x86 CPUs without VNNI their u8×s8 products are summed pairwise in int16 and
    saturate when activation codes near 255 meet weight codes near ±127 (onnxruntime's
    documented "reduce_range" caveat): the digits CNN's logits moved by 3.4 (of 17) under
    onnxruntime 1.32 on an AVX2 machine, in its first convolution (inputs in [0, 1] use
    the whole uint8 range). `options` set further `SessionOptions` attributes.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    for key, value in options.items():
        setattr(so, key, value)
    source = path if isinstance(path, bytes) else str(path)  # a file, or a serialized model
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
