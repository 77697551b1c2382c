"""What layer-by-layer quantization of a decoder language model does, as data.

`LlmConfig` names the weight method, the weight grid (bits, group size, symmetry) and
the activation quantizer; `plan(cfg)` is the order of the steps (`bridge.llm.sequential`
runs it): with `rotate`, once before the first layer,

    rotate    QuaRot-style randomized Hadamard rotation of the residual stream, the value
              heads and (online) the MLP's inner activations (`jaxq.rotation`)

then, for each decoder layer in turn:

    capture   the layer's inputs (the previous layer's quantized outputs) through its
              Linear layers: second moment `H = E[xxᵀ]`, `mean|x|`, `max|x|`, sampled rows
    awq       AWQ input-channel scales, folded into the producing op (`jaxq.awq`)
    clip      AWQ's per-group weight range search (`jaxq.awq.search_clip`); not for
              q_proj/k_proj, whose errors pass through the attention scores
    gptq|rtn  the codes: GPTQ (`jaxq.gptq`) or round to nearest (`jaxq.groupwise`)
    write     the dequantized weights into the model; the layer's outputs become the next
              layer's inputs
"""

from __future__ import annotations

import dataclasses

from jaxq.keep_acc import Gptq
from jaxq.scheme import QScheme

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
ACTIVATIONS = (None, "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class LlmConfig:
    """Layer-by-layer decoder quantization.

    Attributes:
      method: `"rtn"`, `"gptq"`, `"awq"` or `"awq+gptq"` (AWQ scales, then GPTQ codes).
      w_bit: weight bits (2–8).
      group_size: input columns per weight scale (128: W4A16 g128); None per output channel.
      w_sym: symmetric signed weight grid (`q ∈ [−2^(b−1), 2^(b−1)−1]`, offset 0); False:
          asymmetric with an offset per group.
      a_bit: activation bits of every quantized Linear's input, or None (weight-only).
      activations: `"dynamic"` (symmetric per token, computed on the fly) or `"static"`
          (one symmetric per-tensor scale from the calibration inputs' max|x|); with `a_bit`.
      gptq: GPTQ's block size, damping and activation order (`jaxq.keep_acc.Gptq`).
      awq_grid: candidates of AWQ's α search (and of its clipping ratios).
      clip: search each weight group's range (AWQ's clipping); None: on for the AWQ
          methods, off otherwise.
      rotate: rotate the model before quantizing it (`jaxq.rotation`); its float function
          is unchanged.
      online_hadamard: with `rotate`, also rotate the MLP's inner activations, which needs
          one matrix product per layer at run time (a forward hook; compressed-tensors
          checkpoints cannot carry it).
      awq_rows: input rows per layer group kept for AWQ's error.
      ignore: Linear layers left float, by module name (the LM head is always left float).
      seed: the rotation's random signs and the row sample.
    """

    method: str = "gptq"
    w_bit: int = 4
    group_size: int | None = 128
    w_sym: bool = True
    a_bit: int | None = None
    activations: str | None = None
    gptq: Gptq = Gptq()
    awq_grid: int = 20
    clip: bool | None = None
    rotate: bool = False
    online_hadamard: bool = True
    awq_rows: int = 4096
    ignore: tuple = ()
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"LlmConfig.method={self.method!r}: one of {METHODS}")
        if isinstance(self.w_bit, bool) or self.w_bit not in range(2, 9):
            raise ValueError(f"LlmConfig.w_bit={self.w_bit!r}: an int from 2 to 8")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"LlmConfig.group_size={self.group_size!r}: an int ≥ 1, or None per output channel")
        if (self.a_bit is None) != (self.activations is None):
            raise ValueError(
                f"LlmConfig.a_bit={self.a_bit!r}, activations={self.activations!r}: set both "
                "(e.g. a_bit=8, activations='dynamic') or neither (weight-only)"
            )
        if self.a_bit is not None and (isinstance(self.a_bit, bool) or self.a_bit not in range(2, 17)):
            raise ValueError(f"LlmConfig.a_bit={self.a_bit!r}: an int from 2 to 16, or None")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"LlmConfig.activations={self.activations!r}: one of {ACTIVATIONS}")
        if not isinstance(self.gptq, Gptq):
            raise ValueError(f"LlmConfig.gptq={self.gptq!r}: a jaxq.keep_acc.Gptq")
        if isinstance(self.awq_grid, bool) or not isinstance(self.awq_grid, int) or self.awq_grid < 1:
            raise ValueError(f"LlmConfig.awq_grid={self.awq_grid!r}: an int ≥ 1")
        if self.clip is not None and not isinstance(self.clip, bool):
            raise ValueError(f"LlmConfig.clip={self.clip!r}: True, False or None")
        for field in ("w_sym", "rotate", "online_hadamard"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"LlmConfig.{field}={getattr(self, field)!r}: True or False")
        object.__setattr__(self, "ignore", tuple(self.ignore))

    @property
    def weight_scheme(self) -> QScheme:
        return QScheme(bits=self.w_bit, signed=True, symmetric=self.w_sym, axis=0)

    @property
    def act_scheme(self) -> QScheme | None:
        return None if self.a_bit is None else QScheme(bits=self.a_bit, signed=True, symmetric=True, axis=None)

    @property
    def clips(self) -> bool:
        """Whether weight ranges are searched (`clip`, resolved)."""
        return self.method.startswith("awq") if self.clip is None else self.clip

    def describe(self) -> str:
        """`W4A16 g128 gptq` and the like."""
        acts = "16" if self.a_bit is None else f"{self.a_bit}{'' if self.activations == 'static' else ' dynamic'}"
        group = f" g{self.group_size}" if self.group_size else ""
        return f"W{self.w_bit}A{acts}{group} {self.method}{' + rotation' if self.rotate else ''}"


def plan(cfg: LlmConfig) -> tuple[str, ...]:
    """The steps, in order (module docstring): `rotate` once, the rest per decoder layer."""
    steps = ["rotate"] if cfg.rotate else []
    steps.append("capture")
    if cfg.method.startswith("awq"):
        steps.append("awq")
    if cfg.clips:
        steps.append("clip")
    steps.append("gptq" if cfg.method.endswith("gptq") else "rtn")
    steps.append("write")
    return tuple(steps)
