"""Lowering: a torch module and an example batch → a pure JAX function (docs/design.md §5b).

`lower(module, example)` runs the module's own `forward` on JAX arrays through torchax
and gives `f(params, buffers, args, kwargs) -> outputs`, where `params` are the float
parameters (what may be differentiated) and `buffers` everything else (running
statistics, integer counters). The module is checked against torch on the example
batch; a module torchax cannot run raises `LoweringError` naming the operator, and
the torch path of jaxq is unaffected.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from bridge.capture.data import Batch
from bridge.jax_model.compat import torchax_env


class LoweringError(RuntimeError):
    """The module cannot run as a JAX function (an operator torchax lacks, data-dependent
    Python control flow, outputs that are not tensors); the torch path still works."""


@dataclasses.dataclass
class LoweredModel:
    """`fn(params, buffers, args, kwargs)`: the module as a pure JAX function.

    `params` / `buffers`: name → `jax.Array` (the module's `named_parameters` without tied
    duplicates / `named_buffers`). `hooks` run inside `fn` as the module's own forward hooks
    do (on torchax tensors). `parity`: max |Δ| of the outputs against torch on the example.
    """

    fn: Callable
    params: dict[str, jax.Array]
    buffers: dict[str, jax.Array]
    module: nn.Module
    tied: dict[str, list[str]]
    parity: float = float("nan")

    def __call__(self, *args, **kwargs):
        return self.fn(self.params, self.buffers, args, kwargs)


def _call_module(module, *args, **kwargs):
    return module(*args, **kwargs)  # through __call__: the module's own hooks run


def tied_parameters(module: nn.Module) -> dict[str, list[str]]:
    """First name → the other names of every parameter reachable under several names."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names[1:] for names in by_id.values() if len(names) > 1}


def batch_args(batch) -> tuple[tuple, dict]:
    """A calibration batch (tensor, tuple of positional inputs, dict of keyword inputs, or
    `bridge.capture.data.Batch`) as (args, kwargs)."""
    if isinstance(batch, Batch):
        return tuple(batch.args), dict(batch.kwargs)
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def to_jax_tree(tree):
    return jax.tree.map(lambda t: jnp.asarray(t.detach().cpu().numpy()) if isinstance(t, torch.Tensor) else t, tree)


def lower(module: nn.Module, example=None, check: bool = True) -> LoweredModel:
    """`module` as a pure JAX function; with `example` (a batch), checked against torch.

    The module is used as it is (not copied): lower a copy if you will change it."""
    env = torchax_env()
    from torchax import interop

    tied = tied_parameters(module)
    dropped = {n for names in tied.values() for n in names}
    params = {n: p for n, p in module.named_parameters(remove_duplicate=False) if n not in dropped}
    buffers = dict(module.named_buffers())
    jparams = {
        n: jnp.asarray(p.detach().cpu().float().numpy() if p.is_floating_point() else p.detach().cpu().numpy())
        for n, p in params.items()
    }
    jbuffers = {n: jnp.asarray(b.detach().cpu().numpy()) for n, b in buffers.items()}
    from torch.nn.utils import stateless

    def fn(params, buffers, args=(), kwargs=None):
        state = dict(params)
        state.update(buffers)
        for first, others in tied.items():
            for name in others:
                state[name] = state[first]
        state, args, kwargs = env.j2t_iso((state, tuple(args), dict(kwargs or {})))
        with env, stateless._reparametrize_module(module, state):
            out = _call_module(module, *args, **kwargs)
        return interop.jax_view(_plain(out))

    lowered = LoweredModel(fn, jparams, jbuffers, module, tied)
    if example is not None and check:
        lowered.parity = check_parity(lowered, example)
    return lowered


def _plain(out):
    """Model outputs as plain containers (transformers' ModelOutput → dict)."""
    if isinstance(out, torch.Tensor) or out is None or isinstance(out, (int, float, bool)):
        return out
    if isinstance(out, dict):
        return {k: _plain(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return (
            type(out)(_plain(v) for v in out)
            if isinstance(out, tuple) and not hasattr(out, "_fields")
            else [_plain(v) for v in out]
        )
    raise LoweringError(
        f"the module returns a {type(out).__name__}; the JAX model supports tensors, tuples, lists and dicts"
    )


def run_lowered(lowered: LoweredModel, batch) -> Any:
    """`lowered` on `batch`, jitted; inputs that are not tensors (a block's `drop_connect_rate`,
    flags) stay Python values, as the module's `forward` may branch on them."""
    args, kwargs = batch_args(batch)
    leaves, treedef = jax.tree.flatten((to_jax_tree(args), to_jax_tree(kwargs)))
    is_array = [isinstance(leaf, jax.Array) for leaf in leaves]

    def call(params, buffers, arrays):
        it = iter(arrays)
        a, k = jax.tree.unflatten(treedef, [next(it) if arr else leaf for leaf, arr in zip(leaves, is_array)])
        return lowered.fn(params, buffers, a, k)

    return jax.jit(call)(lowered.params, lowered.buffers, [leaf for leaf, arr in zip(leaves, is_array) if arr])


def check_parity(lowered: LoweredModel, example) -> float:
    """Max |Δ| between the lowered and the torch outputs on `example`; `LoweringError` if it does not run."""
    args, kwargs = batch_args(example)
    try:
        out = run_lowered(lowered, example)
    except Exception as e:  # torchax raises OperatorNotFound, TypeError, ConcretizationTypeError, …
        raise LoweringError(
            f"{type(lowered.module).__name__} cannot run as a JAX function: {type(e).__name__}: {_first_line(e)}"
        ) from e
    with torch.no_grad():
        ref = _plain(lowered.module(*args, **kwargs))
    ref_leaves = [
        np.asarray(t.detach().float().cpu().numpy())
        for t in jax.tree.leaves(ref, is_leaf=lambda t: isinstance(t, torch.Tensor))
        if isinstance(t, torch.Tensor)
    ]
    out_leaves = [np.asarray(t, np.float32) for t in jax.tree.leaves(out)]
    if len(ref_leaves) != len(out_leaves):
        raise LoweringError(f"the JAX function returns {len(out_leaves)} arrays, torch {len(ref_leaves)}")
    return max((float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(ref_leaves, out_leaves)), default=0.0)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
