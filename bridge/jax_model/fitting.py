"""What the steps that fit the model lowered to JAX share (block reconstruction, `pd_quant`):
the inputs and float outputs of a block (the whole model: `""`) captured by torch hooks,
token batches padded to one shape, and a training program compiled within a memory budget."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bridge.capture.data import Batch, run_model
from bridge.jax_model.collate import is_token_batch, pad_tokens
from bridge.jax_model.studies import primary


class _Captured(BaseException):
    """Raised by `capture_io`'s hook once a batch's block inputs and output are kept: the
    rest of the forward is not needed. A `BaseException`, so that a model's own `except
    Exception` does not swallow it."""


def capture_io(model: nn.Module, block: str, batches) -> tuple[list, list, list]:
    """Per batch: the block's (args, kwargs) and output on its first call; each batch's
    forward stops there (an early block costs a fraction of a forward)."""
    ins, outs = [], []

    def hook(_m, args, kwargs, out):
        if len(ins) == len(outs) == n_done[0]:
            ins.append(
                (
                    tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                    {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                )
            )
            outs.append(primary(out).detach().clone())
            raise _Captured

    n_done = [0]
    handle = model.get_submodule(block).register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, b in batches:
                try:
                    run_model(model, b, i)
                except _Captured:
                    pass
                n_done[0] += 1
    finally:
        handle.remove()
    return [a for a, _ in ins], [k for _, k in ins], outs


def stack_inputs(args_list, kwargs_list):
    """Tensor inputs concatenated along the sample axis; everything else from the first batch (static)."""
    n_args = len(args_list[0])
    tensors_args = [i for i in range(n_args) if isinstance(args_list[0][i], torch.Tensor)]
    tensor_kwargs = [k for k, v in kwargs_list[0].items() if isinstance(v, torch.Tensor)]
    args = tuple(torch.cat([a[i] for a in args_list]) for i in tensors_args)
    kwargs = {k: torch.cat([kw[k] for kw in kwargs_list]) for k in tensor_kwargs}
    static_args = {i: args_list[0][i] for i in range(n_args) if i not in tensors_args}
    static_kwargs = {k: v for k, v in kwargs_list[0].items() if k not in tensor_kwargs}
    return (args, kwargs), (n_args, tensors_args, static_args, static_kwargs)


def equal_shapes(batches: list, size: int = 8):
    """Token batches of different lengths padded to one length (attention mask 0) and
    regrouped `size` at a time, so every block sees inputs of one shape; their token mask.
    Other batches as they are."""
    plain = [b for _, b in batches]
    if (
        len(plain) < 2
        or not all(is_token_batch(b) for b in plain)
        or len({b.kwargs["attention_mask"].shape[1] for b in plain}) == 1
    ):
        return batches, None
    merged = pad_tokens(plain)
    n = merged.token_mask.shape[0]
    out = [
        (i // size, Batch((), {k: v[i : i + size] for k, v in merged.batch.kwargs.items()})) for i in range(0, n, size)
    ]
    return out, merged.token_mask


def compile_within(compile_for: Callable, micro: int, budget: int | None, halvable=lambda micro: micro > 1):
    """`(compile_for(micro), micro, its temporaries in bytes)`: `micro` (samples per gradient
    pass) halved while the compiled program's temporaries exceed `budget` and `halvable(micro)`
    (None budget, or temporaries XLA does not report: the first program)."""
    while True:
        compiled = compile_for(micro)
        working = temporaries(compiled)
        if budget is None or working is None or working <= budget or not halvable(micro):
            return compiled, micro, working
        micro //= 2


def temporaries(compiled) -> int | None:
    """Bytes of XLA temporaries a compiled program allocates; None where not reported."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except (AttributeError, NotImplementedError, TypeError):
        return None
