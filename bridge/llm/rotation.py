"""QuaRot-style rotation of a Llama-layout decoder in place (`jaxq.rotation` states the math).

    1. every RMSNorm's weight is folded into the Linear layers that read it (and set to 1);
    2. the residual stream is rotated by `Q` (randomized Hadamard, width `hidden_size`):
       embedding `E·Q`; q/k/v/gate/up/lm_head `W·Q`; o_proj/down_proj `Qᵀ·W`;
    3. each attention head's values by `B` (randomized Hadamard, width `head_dim`):
       v_proj `Bᵀ·W` per head, o_proj `W·B` per head (attention is linear in the values);
    4. with `online=True`, the MLP's inner activations by `D` (width `intermediate_size`):
       down_proj `W·D`, and a forward pre-hook multiplies down_proj's input by `D`.

Steps 1–3 change only weights; step 4 adds one matrix product per layer at run time
(a checkpoint cannot carry it). The float model computes the same function (to float32
rounding: the products are formed in float64).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bridge.llm.decoder import decoder_parts
from jaxq.rotation import random_hadamard

READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITES = ("self_attn.o_proj", "mlp.down_proj")


def _set(p: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    gamma = norm.weight.detach().double()
    for lin in linears:
        _set(lin.weight, lin.weight.double() * gamma[None, :])
    _set(norm.weight, torch.ones_like(gamma))


class OnlineRotation:
    """Forward pre-hook `x → x·D` (step 4)."""

    def __init__(self, d: np.ndarray):
        self.d = torch.from_numpy(d.astype(np.float32))

    def __call__(self, _module, args):
        x = args[0]
        return ((x @ self.d.to(x.dtype)), *args[1:])


def rotate_decoder(model: nn.Module, seed: int = 0, online: bool = True) -> list:
    """Rotate `model` in place (module docstring); returns the online hooks' handles."""
    parts = decoder_parts(model)
    cfg = model.config
    if parts.head.weight is parts.embed.weight or getattr(cfg, "tie_word_embeddings", False):
        raise ValueError(
            "rotation needs separate embedding and lm_head weights (the model ties them: "
            "tie_word_embeddings=True); untie them first, e.g. "
            "model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone())"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q = torch.from_numpy(random_hadamard(cfg.hidden_size, seed))
    b = random_hadamard(head_dim, seed + 1)
    b_v = torch.from_numpy(np.kron(np.eye(cfg.num_key_value_heads), b))
    b_o = torch.from_numpy(np.kron(np.eye(cfg.num_attention_heads), b))
    handles = []
    for layer in parts.layers:
        m = {n: layer.get_submodule(n) for n in (*READS, *WRITES)}
        _fold_norm(layer.input_layernorm, [m[n] for n in READS[:3]])
        _fold_norm(layer.post_attention_layernorm, [m[n] for n in READS[3:]])
        _set(m["self_attn.v_proj"].weight, b_v.T @ m["self_attn.v_proj"].weight.double())
        if m["self_attn.v_proj"].bias is not None:
            _set(m["self_attn.v_proj"].bias, m["self_attn.v_proj"].bias.double() @ b_v)
        _set(m["self_attn.o_proj"].weight, m["self_attn.o_proj"].weight.double() @ b_o)
        for n in READS:
            _set(m[n].weight, m[n].weight.double() @ q)
        for n in WRITES:
            _set(m[n].weight, q.T @ m[n].weight.double())
            if m[n].bias is not None:
                _set(m[n].bias, m[n].bias.double() @ q)
        if online:
            d = random_hadamard(m["mlp.down_proj"].in_features, seed + 2)
            _set(m["mlp.down_proj"].weight, m["mlp.down_proj"].weight.double() @ torch.from_numpy(d))
            handles.append(m["mlp.down_proj"].register_forward_pre_hook(OnlineRotation(d)))
    _fold_norm(parts.norm, [parts.head])
    _set(parts.embed.weight, parts.embed.weight.double() @ q)
    _set(parts.head.weight, parts.head.weight.double() @ q)
    return handles
