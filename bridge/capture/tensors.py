"""Torch ↔ JAX at the bridge boundary.

torch → JAX: `detach`, to CPU if needed, `contiguous`, then DLPack (zero copy on CPU).
JAX → torch: a fresh torch tensor copied from the JAX buffer, never an alias of it.
"""

from __future__ import annotations

import jax
import torch


def to_jax(t: torch.Tensor) -> jax.Array:
    """A JAX view (CPU) or copy (other devices) of `t`."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return jax.dlpack.from_dlpack(t.contiguous())


def layer_input(args: tuple, kwargs: dict):
    """A layer's input as its hooks see it: the first positional argument, or the keyword
    `input` (`layer(input=x)`), or the first keyword argument."""
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    return next(iter(kwargs.values()))


def tensors_in(obj):
    """Every tensor inside nested tuples, lists, dicts and dict-like outputs, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, dict) or hasattr(obj, "items"):
        for v in obj.values():
            yield from tensors_in(v)
