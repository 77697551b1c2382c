"""ONNX QDQ export of a fake-quant model (QuantizeLinear/DequantizeLinear pairs)."""
from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from bridge.data import Batch
from bridge.export import ExportError, atomic_directory


class _KeywordAdapter(nn.Module):
    """Positional inputs → the model's keyword inputs; structured outputs → a tuple."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)))
        return out.to_tuple() if hasattr(out, "to_tuple") else out


def export_qdq(model: nn.Module, batch: Batch, model_arch: str, save_path, input_names=None, output_names=None,
               opset_version: int = 17) -> list:
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
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset_version, input_names=input_names,
                          output_names=output_names, dynamic_axes={n: {0: "batch"} for n in input_names})
    with atomic_directory(save_path) as staging:
        (staging / f"{model_arch}.onnx").write_bytes(buf.getvalue())
    from pathlib import Path

    return [Path(save_path) / f"{model_arch}.onnx"]
