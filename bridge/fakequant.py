"""`QuantWrapper`: a fake-quant layer that keeps the original module inside.

    x̂ = (clamp(round(x · (1/s_x)) + o_x, qmin, qmax) − o_x) · s_x        (per tensor)
    Ŵ = (clamp(round(W · (1/s_c)) + o_c, qmin, qmax) − o_c) · s_c        (per out-channel c)
    y = module.forward(x̂)  with  module.weight := Ŵ

The original module's own `forward` runs, so subclasses that pad or reshape first
(`Conv2dStaticSamePadding`) keep working: `Ŵ` is a `torch.nn.utils.parametrize`
parametrization of the module's `weight` (which stays the float original under
`module.parametrizations.weight.original`). Parametrizations trace, so the model works
with `torch.export`, `torch.compile` and the ONNX exporter, where `Ŵ` and `x̂` become
QuantizeLinear/DequantizeLinear pairs. Buffers use msModelSlim's names:
`input_scale`, `input_offset`, `weight_scale`, `weight_offset`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

import jax.numpy as jnp
import numpy as np

from jaxq import QParams, QScheme, quantize


class _OwnedParametrization(nn.Module):
    """A parametrization that reads its owning wrapper's buffers and switch.

    The owner is kept out of the module tree (a plain attribute), so the wrapper does not
    contain itself.
    """

    def __init__(self, owner: "QuantWrapper"):
        super().__init__()
        self.__dict__["owner"] = owner


class _FakeQuantWeight(_OwnedParametrization):
    """Parametrization `W ↦ Ŵ`."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        owner = self.__dict__["owner"]
        if not owner.quant_enabled:
            return w
        scheme = owner.weight_scheme
        source = w.float() if owner.weight_codes is None else owner.dequantized_codes()
        wq = torch.fake_quantize_per_channel_affine(
            source, owner.weight_scale, owner.weight_offset, 0, scheme.qmin, scheme.qmax
        )
        return wq.to(w.dtype)


class _CorrectedBias(_OwnedParametrization):
    """Parametrization `b ↦ b + δ` (bias correction) while the owner's quantization is on."""

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        owner = self.__dict__["owner"]
        if not owner.quant_enabled or owner.bias_correction is None:
            return b
        return (b.float() + owner.bias_correction).to(b.dtype)


class QuantWrapper(nn.Module):
    """Fake-quantizes the input activation and the weight of `module`."""

    def __init__(self, module: nn.Module, weight_scheme: QScheme, act_scheme: QScheme | None):
        super().__init__()
        self.module = module
        self.weight_scheme = weight_scheme
        self.act_scheme = act_scheme
        self.quant_enabled = False
        out_channels = module.weight.shape[0]
        device = module.weight.device
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("weight_offset", torch.zeros(out_channels, dtype=torch.int32, device=device))
        if act_scheme is not None:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
            self.register_buffer("input_offset", torch.zeros((), dtype=torch.int32, device=device))
        # Integer codes chosen by a rounding algorithm (SQuant, AdaRound); None = round to nearest.
        self.register_buffer("weight_codes", None, persistent=False)
        # Bias correction δ (`jaxq.bias_correction`), added to the bias while quantized.
        self.register_buffer("bias_correction", None, persistent=False)
        self._added_bias = False  # the module had no bias; one of zeros carries δ
        self._input_qparams = (1.0, 0)  # Python copy of (input_scale, input_offset), see fake_quant_input
        parametrize.register_parametrization(module, "weight", _FakeQuantWeight(self), unsafe=True)

    @property
    def act_quant(self) -> bool:
        return self.act_scheme is not None

    def set_qparams(self, weight_scale, weight_offset, input_scale=None, input_offset=None) -> None:
        """Copy quantization parameters into the buffers (no aliasing of the sources)."""
        with torch.no_grad():
            self.weight_scale.copy_(torch.as_tensor(weight_scale).reshape(self.weight_scale.shape))
            self.weight_offset.copy_(torch.as_tensor(weight_offset).reshape(self.weight_offset.shape))
            if self.act_quant:
                self.input_scale.copy_(torch.as_tensor(input_scale).reshape(()))
                self.input_offset.copy_(torch.as_tensor(input_offset).reshape(()))
                self._input_qparams = (float(self.input_scale), int(self.input_offset))

    def set_weight_codes(self, codes: torch.Tensor | None) -> None:
        """Simulate these integer weight codes `q` (`Ŵ = (q − o)·s`) instead of rounding
        the float weight to nearest; None returns to round-to-nearest."""
        if codes is None:
            self.weight_codes = None
            return
        codes = torch.as_tensor(codes).to(device=self.weight_scale.device, dtype=torch.int32)
        if codes.shape != self.float_weight.shape:
            raise ValueError(f"weight codes of shape {tuple(codes.shape)} do not match the weight {tuple(self.float_weight.shape)}")
        self.weight_codes = codes.clone()

    def set_bias_correction(self, delta: torch.Tensor | None) -> None:
        """Add `δ` (`[out]`) to the module's bias while quantization is on (`b̂ = b + δ`);
        None removes it. A module without a bias gets a zero bias to carry `δ` (removed
        again by `unwrap`)."""
        if delta is None:
            self.bias_correction = None
            return
        module = self.module
        delta = torch.as_tensor(delta).to(device=self.weight_scale.device, dtype=torch.float32).reshape(-1)
        if delta.numel() != self.weight_scale.numel():
            raise ValueError(f"bias correction of {delta.numel()} values does not match {self.weight_scale.numel()} output channels")
        if not parametrize.is_parametrized(module, "bias"):
            if module.bias is None:
                w = self.float_weight
                module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
                self._added_bias = True
            parametrize.register_parametrization(module, "bias", _CorrectedBias(self), unsafe=True)
        self.bias_correction = delta.clone()

    @property
    def float_bias(self) -> torch.Tensor | None:
        """The original bias (None if the module has none)."""
        if parametrize.is_parametrized(self.module, "bias"):
            return None if self._added_bias else self.module.parametrizations.bias.original
        return self.module.bias

    def corrected_bias(self) -> torch.Tensor | None:
        """The bias of the quantized layer, `b + δ` (whether quantization is on or off)."""
        b = self.float_bias
        if self.bias_correction is None:
            return b
        return self.bias_correction.clone() if b is None else b.detach().float() + self.bias_correction

    def dequantized_codes(self) -> torch.Tensor:
        """`(q − o)·s` of the stored codes; fake-quantizing it returns it unchanged, so the
        graph keeps its weight QuantizeLinear/DequantizeLinear pair."""
        shape = (-1,) + (1,) * (self.weight_codes.dim() - 1)
        return (self.weight_codes - self.weight_offset.reshape(shape)).float() * self.weight_scale.reshape(shape)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.act_quant:  # keep the Python copy in step with loaded buffers
            self._input_qparams = (float(self.input_scale), int(self.input_offset))

    @property
    def float_weight(self) -> torch.Tensor:
        """The original float weight (the parametrization's input)."""
        return self.module.parametrizations.weight.original

    def fake_quant_weight(self) -> torch.Tensor:
        """`Ŵ` (the float weight when quantization is off)."""
        return self.module.weight

    def unwrap(self) -> nn.Module:
        """The original module with its float weight restored (parametrization removed)."""
        parametrize.remove_parametrizations(self.module, "weight", leave_parametrized=False)
        if parametrize.is_parametrized(self.module, "bias"):
            parametrize.remove_parametrizations(self.module, "bias", leave_parametrized=False)
            if self._added_bias:
                self.module.bias = None
                self._added_bias = False
        return self.module

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act_scheme
        scale, offset = self._input_qparams
        if _eager_cpu_inference(x):
            xq = fake_quant_per_tensor_cpu(x.float(), scale, offset, s.qmin, s.qmax)
        else:
            # Python numbers, not the buffers: the float-qparams op has the meta kernels that
            # torch.export needs for dynamic shapes (the tensor-qparams one has none).
            xq = torch.fake_quantize_per_tensor_affine(x.float(), scale, offset, s.qmin, s.qmax)
        return xq.to(x.dtype)

    def forward(self, x, *args, **kwargs):
        if self.quant_enabled and self.act_quant:
            x = self.fake_quant_input(x)
        return self.module(x, *args, **kwargs)

    def extra_repr(self) -> str:
        a = "float" if self.act_scheme is None else f"int{self.act_scheme.bits}"
        return f"w=int{self.weight_scheme.bits} per-channel, a={a}, enabled={self.quant_enabled}"


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    """A plain CPU tensor, no gradient, not being traced (export, compile, jit)."""
    return (type(x) is torch.Tensor and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def fake_quant_per_tensor_cpu(x: torch.Tensor, scale: float, offset: int, qmin: int, qmax: int) -> torch.Tensor:
    """`torch.fake_quantize_per_tensor_affine` bit for bit on finite float32 input, ~7×
    faster on CPU: torch's kernel is scalar and single-threaded, these in-place ops are
    vectorised. Same arithmetic: `(clamp(round(x·s⁻¹) + o, qmin, qmax) − o)·s` with
    `s⁻¹ = 1/s` in float32 and round half to even. (torch maps NaN to `qmin`; this keeps NaN.)
    """
    inv = float(np.float32(1.0) / np.float32(scale))
    y = torch.mul(x, inv)
    return y.round_().add_(offset).clamp_(qmin, qmax).sub_(offset).mul_(scale)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (setattr on its parent)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrappers(model: nn.Module) -> dict[str, QuantWrapper]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWrapper)}


def custom_codes(wrapper: QuantWrapper, codes: np.ndarray) -> torch.Tensor | None:
    """`codes` as a tensor if they differ from rounding the float weight to nearest
    (SQuant, AdaRound), else None."""
    qp = QParams(jnp.asarray(wrapper.weight_scale.cpu().numpy()),
                 jnp.asarray(wrapper.weight_offset.cpu().numpy()), wrapper.weight_scheme)
    nearest = np.asarray(quantize(wrapper.float_weight.detach().float().cpu().numpy(), qp))
    return None if np.array_equal(nearest, codes.astype(np.int32)) else torch.from_numpy(codes.astype(np.int32))
