"""Streaming capture of layer-input statistics with forward pre-hooks.

For every batch, each hooked layer's input is flattened into a power-of-two buffer (so
batches of varying shape reuse one compiled update) and handed to the jitted observer
update; only the fixed-shape observer state is kept, never the activation itself.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
import torch
from torch import nn

import jaxq
from bridge.tensors import to_jax

MIN_BUCKET = 1024


class NonFiniteActivationError(FloatingPointError):
    """A captured activation contains NaN or Inf."""


def bucket_size(n: int) -> int:
    """Smallest power of two ≥ n (at least `MIN_BUCKET`)."""
    return max(MIN_BUCKET, 1 << math.ceil(math.log2(max(n, 1))))


def _fill(buf: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Copy `x` flattened into `buf`; the tail repeats `x`'s first entry (the observers'
    padding contract)."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    buf[:n].copy_(flat)
    buf[n:].fill_(float(flat[0]) if n else 0.0)
    return buf, n


class BufferPool:
    """One reusable padded buffer per size, with its zero-copy JAX view.

    Reuse avoids page faults of fresh allocations and a DLPack import per call. The
    JAX view aliases memory that the next `fill` overwrites, so a caller must finish
    (block on) the computation that reads it first — `ActivationCapture` does.
    """

    def __init__(self):
        self._pool: dict[int, tuple[torch.Tensor, jax.Array]] = {}

    def fill(self, x: torch.Tensor) -> tuple[jax.Array, int]:
        size = bucket_size(x.numel())
        if size not in self._pool:
            buf = torch.empty(size, dtype=torch.float32)
            self._pool[size] = (buf, to_jax(buf))
        buf, view = self._pool[size]
        _, n = _fill(buf, x)
        return view, n


def observer_for(cfg: jaxq.QuantConfig, num_batches: int | None) -> jaxq.Observer:
    """The activation observer that `cfg.act_method` asks for."""
    if cfg.act_method == 0:
        return jaxq.sigma_statistic(float(cfg.sigma))
    if cfg.act_method == 1:
        if cfg.minmax_combine == "running":
            return jaxq.running_minmax()
        return jaxq.batch_percentile_minmax(capacity=_capacity(num_batches))
    return jaxq.histogram_observer(bins=cfg.hist_bins, levels=2**cfg.a_bit)


def _capacity(num_batches: int | None) -> int:
    """Slots for per-batch extremes: the batch count rounded up to a power of two."""
    return max(16, 1 << math.ceil(math.log2(num_batches or 4096)))


class ActivationCapture:
    """Forward pre-hooks that stream layer inputs into observer states."""

    def __init__(self, layers: dict[str, nn.Module], observer: jaxq.Observer):
        self.observer = observer
        self.states = {name: observer.init() for name in layers}
        self._layers = layers
        self._handles: list = []
        self._pool = BufferPool()

    def _hook(self, name: str) -> Callable:
        def hook(_module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            view, n = self._pool.fill(x)
            state = jaxq.update_observer(self.states[name], view, np.int32(n), self.observer)
            self.states[name] = jax.block_until_ready(state)  # the pool reuses `view`
        return hook

    def __enter__(self):
        for name, module in self._layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def check_finite(results: dict[str, jaxq.ActivationResult]) -> None:
    """Raise naming the first layer (and batch) whose captured input was not finite."""
    for name, r in results.items():
        bad = int(np.asarray(r.first_bad))
        if bad >= 0:
            raise NonFiniteActivationError(
                f"layer {name!r}: its input in calib_data batch {bad} contains NaN or Inf; "
                "check the data or the preceding layers"
            )
