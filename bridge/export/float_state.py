"""The float tensors a quantized model's output depends on besides its weight codes.

`export_param` carries them (`float_params.safetensors`): every parameter and buffer of
the model as jaxq leaves it (Conv+BN folded), under the names it has without quantizers —
biases of quantized layers, float layers, norms, embeddings, BN statistics of unfused BNs.
The weights of quantized layers are carried by their codes instead. A reload writes them
into the model, so it computes what the calibrated model computed when it was exported,
after fine-tuning or not; the values it replaced are logged for `restore_model`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bridge.inplace.fakequant import BUFFERS, has_ours, quantizer_of


def live_float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{name: tensor}` of every float-model tensor except quantized layers' weights,
    named as in the model without quantizers (the tensors themselves, not copies)."""
    out: dict[str, torch.Tensor] = {}
    # jaxq's parametrization lists: the weight travels as codes, the bias under its own name
    ours = {
        id(m.parametrizations[t])
        for m in model.modules()
        if (q := quantizer_of(m)) is not None
        for t in (q.param, q.bias_param)
        if has_ours(m, t)
    }
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if id(module) in ours:
            continue
        q = quantizer_of(module)
        for pname, p in module._parameters.items():
            if p is not None:
                out[prefix + pname] = p
        if q is not None and has_ours(module, q.bias_param) and q.float_bias is not None:
            out[prefix + q.bias_param] = q.float_bias
        for bname, b in module._buffers.items():
            if (
                b is not None
                and not (q is not None and bname in BUFFERS)
                and bname not in module._non_persistent_buffers_set
            ):
                out[prefix + bname] = b
    return out


def float_state(model: nn.Module) -> dict[str, np.ndarray]:
    """`live_float_tensors` as numpy arrays for a safetensors file (bfloat16 as float32)."""
    out = {}
    for name, t in live_float_tensors(model).items():
        t = t.detach().cpu()
        out[name] = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().copy()
    return out


def check_float_state(model: nn.Module, stored: dict[str, np.ndarray], source: str) -> dict[str, torch.Tensor]:
    """The model's tensors for `stored`, after checking names and shapes (`ValueError`
    naming `source` and the tensor)."""
    live = live_float_tensors(model)
    missing, extra = sorted(set(stored) - set(live)), sorted(set(live) - set(stored))
    if missing or extra:
        raise ValueError(
            f"{source} was exported from a model with other tensors: the model lacks {missing[:4]}"
            f"{'…' if len(missing) > 4 else ''} and has {extra[:4]}{'…' if len(extra) > 4 else ''} "
            "that the export does not carry; load it into the architecture that was calibrated"
        )
    for name, arr in stored.items():
        if tuple(live[name].shape) != tuple(arr.shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, the model's has {tuple(live[name].shape)}"
            )
    return live


def write_float_state(
    live: dict[str, torch.Tensor], stored: dict[str, np.ndarray]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copy `stored` into the model's tensors; returns `(tensor, value before)` of the changed ones."""
    replaced = []
    with torch.no_grad():
        for name, arr in stored.items():
            t = live[name]
            value = torch.from_numpy(np.ascontiguousarray(arr)).to(device=t.device, dtype=t.dtype)
            if not torch.equal(t, value):
                replaced.append((t, t.detach().clone()))
                t.copy_(value)
    return replaced
