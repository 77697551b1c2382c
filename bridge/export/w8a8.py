"""msModelSlim's W8A8 deployment layout and the integer arithmetic it encodes.

Per quantized layer (symmetric int8 weights, per-tensor activations shifted to int8):

    x_q8       = clamp(round(x · (1/s_x)) + o_x, qmin, qmax) − shift    (shift 128 if unsigned, else 0)
    o8         = o_x − shift                                            (`.input_offset`)
    deq_scale  = s_x · s_w                                              (per output channel)
    quant_bias = round(b / deq_scale − o8 · Σ_{in} W_q)                 (sum over every input dim)
    y          = deq_scale · (Σ_{in} W_q · x_q8 + quant_bias)

which equals the fake-quant layer `Σ Ŵ x̂ + b` up to the rounding of `b / deq_scale`
(at most `deq_scale / 2`). Integer kernels must pad with `o8` (the code of 0.0), not 0.

`quant_bias` is int32. A channel whose weight codes are all zero (a dead channel; its scale
is the floor EPS, so `b / deq_scale` overflows int32) has a free `deq_scale`, since its
codes are 0 at any scale: it becomes `|b| / 2^30`, so that `deq_scale · quant_bias` is `b`.
Any other channel whose `quant_bias` does not fit int32 (tiny but non-zero weights next to
a normal bias) cannot be expressed: it is saturated to the int32 range with a
`W8A8OverflowWarning` naming the layer and channels (msModelSlim casts it, wrapping around).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from jaxq import LayerSpec


class W8A8Error(ValueError):
    """The calibration cannot be expressed in the W8A8 integer layout."""


class W8A8OverflowWarning(UserWarning):
    """A `quant_bias` does not fit int32 and was saturated."""


def activation_shift(signed: bool) -> int:
    """Offset that moves an unsigned 8-bit code into int8 (`q8 = q − 128`)."""
    return 0 if signed else 128


def layer_tensors(
    name: str,
    q_weight: np.ndarray,
    weight_scale: np.ndarray,
    bias: np.ndarray | None,
    input_scale: float,
    input_offset: int,
    act_signed: bool,
) -> dict[str, np.ndarray]:
    """The W8A8 tensors of one layer (see module docstring)."""
    o8 = int(input_offset) - activation_shift(act_signed)
    deq = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    w2 = q_weight.reshape(q_weight.shape[0], -1).astype(np.int64)
    quant_bias, deq = integer_bias(name, bias, deq, w2, o8)
    out = {
        f"{name}.weight": q_weight.astype(np.int8),
        f"{name}.input_scale": np.array([input_scale], np.float32),
        f"{name}.input_offset": np.array([o8], np.float32),
        f"{name}.deq_scale": deq,
        f"{name}.quant_bias": quant_bias,
    }
    if bias is not None:
        out[f"{name}.bias"] = bias.astype(np.float32)
    return out


def integer_bias(
    name: str, bias: np.ndarray | None, deq: np.ndarray, w_q: np.ndarray, o8: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(quant_bias, deq_scale)` per output channel; `w_q: [out, in]` integer codes (see
    the module docstring for dead channels)."""
    b = np.zeros(w_q.shape[0], np.float64) if bias is None else np.asarray(bias, np.float64)
    dead = ~np.any(w_q != 0, axis=1)
    deq = np.where(dead, np.maximum(deq, (np.abs(b) / 2.0**30).astype(np.float32)), deq).astype(np.float32)
    exact = b / deq.astype(np.float64) - o8 * w_q.sum(axis=1)
    limit = np.iinfo(np.int32)
    bad = np.flatnonzero(~np.isfinite(exact) | (np.abs(exact) > limit.max))
    if bad.size:
        warnings.warn(
            f"{name}: quant_bias of output channel(s) {bad[:8].tolist()} does not fit int32 "
            f"(bias / deq_scale = {exact[bad[0]]:.3g}: weights tiny next to the bias); saturated",
            W8A8OverflowWarning,
            stacklevel=3,
        )
    exact = np.clip(np.nan_to_num(exact), limit.min, limit.max)
    return np.round(exact).astype(np.int32), deq


def check_exportable(w_sym: bool, w_bit: int, a_bit: int, act_quant: bool, w_signed: bool = True) -> None:
    problems = []
    if not w_signed:
        problems.append("w_signed=False (the layout stores int8 weight codes; unsigned codes 0…255 do not fit)")
    if not act_quant:
        problems.append("act_quant=False (W8A8 needs quantized activations)")
    if not w_sym:
        problems.append("w_sym=False (the integer path needs symmetric weights)")
    if w_bit > 8 or a_bit > 8:
        problems.append(f"w_bit={w_bit}, a_bit={a_bit} (int8 containers hold at most 8 bits)")
    if problems:
        raise W8A8Error("export_quant_safetensor cannot express this calibration: " + "; ".join(problems))


def integer_forward(
    spec: LayerSpec,
    t: dict[str, np.ndarray],
    name: str,
    x: torch.Tensor,
    act_qmin: int,
    act_qmax: int,
    act_signed: bool,
) -> torch.Tensor:
    """Reference integer evaluation of one exported layer on float input `x` (float64 exact ints)."""
    s = float(t[f"{name}.input_scale"][0])
    o8 = int(t[f"{name}.input_offset"][0])
    shift = activation_shift(act_signed)
    q = torch.clamp(
        torch.round(x.float() * (1.0 / torch.tensor(s, dtype=torch.float32))) + (o8 + shift), act_qmin, act_qmax
    )
    xq8 = (q - shift).double()
    w = torch.from_numpy(t[f"{name}.weight"].astype(np.float64))
    if spec.kind == "linear":
        acc = xq8 @ w.T
        view = (1,) * (acc.dim() - 1) + (-1,)
    else:
        pads = [p for pair in reversed(spec.padding) for p in pair]
        xq8 = nn.functional.pad(xq8, pads, value=float(o8))
        conv = nn.functional.conv1d if spec.kind == "conv1d" else nn.functional.conv2d
        acc = conv(xq8, w, None, spec.stride, 0, spec.dilation, spec.groups)
        view = (1, -1) + (1,) * (acc.dim() - 2)
    acc = acc + torch.from_numpy(t[f"{name}.quant_bias"].astype(np.float64)).reshape(view)
    return (acc * torch.from_numpy(t[f"{name}.deq_scale"].astype(np.float64)).reshape(view)).float()
