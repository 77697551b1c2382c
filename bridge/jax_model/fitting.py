"""What the steps that fit the model lowered to JAX share (block reconstruction, `pd_quant`):
the inputs and float outputs of a block (the whole model: `""`) captured by torch hooks,
token batches padded to one shape, and a training program compiled within a memory budget."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import torch
from torch import nn

from bridge.capture.data import Batch, run_model
from bridge.jax_model.collate import is_token_batch, pad_tokens
from bridge.jax_model.lower import LoweringError
from bridge.jax_model.studies import primary


class _Captured(BaseException):
    """Raised by `capture_block`'s hook once a batch's block inputs and output are kept: the
    rest of the forward is not needed. A `BaseException`, so that a model's own `except
    Exception` does not swallow it."""


@dataclasses.dataclass
class Captured:
    """A block's inputs and float output over all batches, stacked along the sample axis.

    `inputs`: `(args, kwargs)` of JAX arrays, the tensor arguments only;
    `static`: `(n_args, tensor positions, other args, other kwargs)`, the first batch's;
    `example`: the first batch's inputs as torch tensors (for lowering the block);
    `output`: the block's primary output as float32.
    Each is None where it was not captured (`inputs=False`: the first three)."""

    inputs: tuple | None
    static: tuple | None
    example: Batch | None
    output: jax.Array | None


class _HostStack:
    """One tensor's samples from successive batches, written into one host buffer that JAX
    then reads in place: `jax.device_put` aliases a 64-byte-aligned NumPy array on CPU
    (torch's CPU allocator aligns to 64 bytes), so a stack is held once, not as per-batch
    clones plus their concatenation plus JAX's copy (three times, before)."""

    def __init__(self, batches: int, dtype=None):
        self.batches, self.dtype, self.buf, self.n = batches, dtype, None, 0

    def add(self, t: torch.Tensor, where: str) -> None:
        t = t.detach()
        if t.ndim == 0:
            raise LoweringError(f"{where} is a 0-d tensor; block inputs and outputs need a sample axis")
        k = t.shape[0]
        if self.buf is None:  # room for every batch at this batch's size; grown if one is larger
            self.buf = torch.empty((k * self.batches, *t.shape[1:]), dtype=self.dtype or t.dtype)
        elif tuple(t.shape[1:]) != tuple(self.buf.shape[1:]):
            earlier = ", ".join(map(str, self.buf.shape[1:]))
            raise LoweringError(
                f"{where} has shape {tuple(t.shape)}, but earlier batches' are [*, {earlier}]: "
                "the captured samples must stack along the first axis"
            )
        if self.n + k > self.buf.shape[0]:
            grown = torch.empty((max(2 * self.buf.shape[0], self.n + k), *self.buf.shape[1:]), dtype=self.buf.dtype)
            grown[: self.n].copy_(self.buf[: self.n])
            self.buf = grown
        self.buf[self.n : self.n + k].copy_(t)
        self.n += k

    def to_jax(self) -> jax.Array:
        """The stacked samples; the buffer is handed to JAX (this stack no longer holds it)."""
        buf, self.buf = self.buf, None
        return jax.device_put(buf[: self.n].numpy())


def capture_block(model: nn.Module, block: str, batches, inputs: bool = True, output: bool = True) -> Captured:
    """The block's inputs (`inputs`) and float32 output (`output`) on its first call in
    each batch, stacked (`Captured`; its `static` and `example` only with `inputs`); each
    batch's forward stops there (an early block costs a fraction of a forward).
    `block=""`: the whole model."""
    stacks: dict = {}
    first: list = []  # the first batch's (args, kwargs), cloned when inputs are captured
    out_stack = _HostStack(len(batches), torch.float32)
    where = f"block {block!r}" if block else "the model"

    def take_inputs(_m, args, kwargs):
        # before the block's own pre-hooks (an input rotation): the lowered block runs them again
        i = batch[0]
        if not first:
            first.append((_cloned(args), _cloned(kwargs)))
        tensors = [(p, a) for p, a in enumerate(args) if isinstance(a, torch.Tensor)]
        tensors += [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        for key, t in tensors:
            stacks.setdefault(key, _HostStack(len(batches))).add(t, f"{where}'s input {key!r} in batch {i}")
        if not output:
            called[0] = True
            raise _Captured

    def take_output(_m, _args, out):
        out_stack.add(primary(out), f"{where}'s output in batch {batch[0]}")
        called[0] = True
        raise _Captured

    batch, called = [0], [False]
    module = model.get_submodule(block)
    handles = []
    if inputs:
        handles.append(module.register_forward_pre_hook(take_inputs, with_kwargs=True, prepend=True))
    if output:
        handles.append(module.register_forward_hook(take_output))
    try:
        with torch.no_grad():
            for i, b in batches:
                batch[0] = i
                try:
                    run_model(model, b, i)
                except _Captured:
                    pass
    finally:
        for h in handles:
            h.remove()
    if not called[0]:
        raise LoweringError(f"{where} was not called on the calibration data")
    out = out_stack.to_jax() if output else None
    if not inputs:
        return Captured(None, None, None, out)
    args, kwargs = first[0]
    positions = [p for p in range(len(args)) if isinstance(args[p], torch.Tensor)]
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    static = (
        len(args),
        positions,
        {p: a for p, a in enumerate(args) if p not in positions},
        {k: v for k, v in kwargs.items() if k not in names},
    )
    stacked = (tuple(stacks[p].to_jax() for p in positions), {k: stacks[k].to_jax() for k in names})
    return Captured(stacked, static, Batch(args, kwargs), out)


def _cloned(values):
    """`values` (a tuple or a dict) with each tensor detached and cloned."""
    if isinstance(values, dict):
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in values)


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
