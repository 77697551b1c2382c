"""The parts of a `transformers` decoder language model that layer-by-layer quantization
touches (Llama layout: Llama, Mistral, Qwen2, …), and running one decoder layer alone.

    model.model.embed_tokens → model.model.layers[i] … → model.model.norm → model.lm_head

Inside a layer, the Linear layers that read one tensor form an input group, and each
group's input is produced by an op that can absorb a per-channel scale (AWQ, rotation):

    input_layernorm          → self_attn.q_proj, k_proj, v_proj
    self_attn.v_proj (rows)  → self_attn.o_proj        (only without grouped-query heads)
    post_attention_layernorm → mlp.gate_proj, up_proj
    mlp.up_proj (rows)       → mlp.down_proj
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class InputGroup(NamedTuple):
    """Linear layers (names inside the decoder layer) that read the output of `producer`."""

    producer: str
    linears: tuple[str, ...]


LLAMA_GROUPS = (
    InputGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    InputGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    InputGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    InputGroup("mlp.up_proj", ("mlp.down_proj",)),
)


class DecoderParts(NamedTuple):
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Linear


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The embedding, decoder layers, final norm and LM head (`TypeError` naming what is missing)."""
    inner = getattr(model, "model", None)
    missing = [
        n
        for n, ok in (
            ("model.model", inner is not None),
            ("model.model.embed_tokens", hasattr(inner, "embed_tokens")),
            ("model.model.layers", hasattr(inner, "layers")),
            ("model.model.norm", hasattr(inner, "norm")),
            ("model.lm_head", hasattr(model, "lm_head")),
        )
        if not ok
    ]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a decoder language model in the Llama layout "
            f"(missing {', '.join(missing)}); "
            "layer-by-layer quantization supports transformers' LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
        )
    return DecoderParts(inner.embed_tokens, inner.layers, inner.norm, model.lm_head)


def input_groups(layer: nn.Module) -> tuple[InputGroup, ...]:
    """The layer's input groups present as Linear modules (`TypeError` for another layout);
    `v_proj → o_proj` only when `o_proj`'s input channels are `v_proj`'s output rows one to one."""
    modules = dict(layer.named_modules())
    groups = []
    for g in LLAMA_GROUPS:
        absent = [n for n in (g.producer, *g.linears) if n not in modules]
        if absent:
            raise TypeError(f"decoder layer {type(layer).__name__} has no {', '.join(absent)} (Llama layout expected)")
        if not all(isinstance(modules[n], nn.Linear) for n in g.linears):
            raise TypeError(f"decoder layer {type(layer).__name__}: {g.linears} must be nn.Linear")
        groups.append(g)
    return tuple(groups)


def can_fold_rows(layer: nn.Module, group: InputGroup) -> bool:
    """Whether a per-channel scale of the group's input can be folded into `producer`: a
    norm's weight always; a Linear's output rows when they map one to one onto the input
    columns of the group (no grouped-query attention between `v_proj` and `o_proj`)."""
    producer = layer.get_submodule(group.producer)
    if not isinstance(producer, nn.Linear):
        return hasattr(producer, "weight")
    return all(producer.out_features == layer.get_submodule(n).in_features for n in group.linears)


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """`(hidden_states, kwargs)` that the first decoder layer receives for each batch of
    token ids (the model stops there: nothing after the embedding runs)."""
    parts = decoder_parts(model)
    seen = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = parts.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i, ids in enumerate(batches):
            if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 2:
                raise ValueError(
                    f"calibration batch {i}: token ids [batch, sequence] of int64 expected, got {_describe(ids)}"
                )
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The layer's outputs on every captured input, with the same keyword arguments."""
    out = []
    for hidden, kwargs in inputs:
        y = layer(hidden, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return out
