"""Data-parallel calibration: the observers of every quantized layer's input updated
inside the lowered float model, one program call per calibration batch, the batch axis
split over a `jax.sharding.Mesh` (`jaxq.sharding`).

The update is `jaxq`'s own pure `observer.update(state, x, n)` — the one
`bridge.capture.activations` applies to the inputs torch computes — written for the whole batch;
`jit` partitions it over the mesh, so each device runs the forward on its part of the
batch and XLA combines every observer reduction (min/max, moments, histogram counts)
across devices. The states come back replicated. Min/max and histogram counts equal
the one-device run exactly; moments differ by the float summation order.

A layer's input is flattened and padded to a multiple of `ROW` with its first value
(the observers' padding contract, `jaxq.observers`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from torch import nn

import jaxq
from bridge.jax_model.compat import torchax_env
from bridge.jax_model.lower import LoweredModel, LoweringError, batch_args, lower, to_jax_tree
from bridge.inplace.transaction import quantizer_free_copy
from bridge.inplace.fakequant import along_channels
from jaxq.observers import ROW
from jaxq.sharding import check_mesh, replicate, replicated, shard_batch


class _Tap:
    observe: Callable | None = None


def padded_flat(x: jax.Array) -> tuple[jax.Array, int]:
    """`x` as a flat float32 buffer padded to a multiple of `ROW` with its first value, and its length."""
    flat = jnp.reshape(x, (-1,)).astype(jnp.float32)
    n = flat.shape[0]
    pad = (-n) % ROW
    if pad:
        flat = jnp.concatenate([flat, jnp.broadcast_to(flat[0], (pad,))])
    return flat, n


class InputObserver:
    """The float model (quantizers removed, BN folds kept) as a JAX function that returns
    the updated observer states of the layers `names` after one batch."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        example,
        observer: jaxq.Observer,
        mesh=None,
        smoothing: dict | None = None,
    ):
        """`smoothing`: layer → SmoothQuant factors `s` shaped by `along_channels`; that
        layer's quantizer sees `x / s`."""
        self.names, self.observer = list(names), observer
        self._smoothing = {n: np.asarray(s, np.float32) for n, s in (smoothing or {}).items()}
        self.mesh = None if mesh is None else check_mesh(mesh)
        torchax_env()  # the compatibility step before torchax's first import (hooks below use its interop)
        clone = quantizer_free_copy(model)
        self._tap = _Tap()
        for name in self.names:
            clone.get_submodule(name).register_forward_pre_hook(self._hook(name), with_kwargs=True)
        self.lowered: LoweredModel = lower(clone, example)
        self._params = (self.lowered.params, self.lowered.buffers)
        if self.mesh is not None:
            self._params = replicate(self._params, self.mesh)
        out = None if self.mesh is None else replicated(self.mesh)
        self._step = jax.jit(self._update, out_shardings=out)

    def _hook(self, name: str):
        from torchax import interop

        def hook(_m, args, kwargs):
            if self._tap.observe is not None:
                x = interop.jax_view(args[0] if args else next(iter(kwargs.values())))
                if name in self._smoothing:
                    x = (x.astype(jnp.float32) / self._smoothing[name]).astype(x.dtype)
                self._tap.observe(name, x)

        return hook

    def _update(self, params, buffers, states, args, kwargs):
        new = dict(states)

        def observe(name, x):
            flat, n = padded_flat(x)
            new[name] = self.observer.update(new[name], flat, jnp.int32(n))

        self._tap.observe = observe
        try:
            self.lowered.fn(params, buffers, args, kwargs)  # the output is unused: XLA drops what follows the last tap
        finally:
            self._tap.observe = None
        return new

    def init(self) -> dict:
        initial = self.observer.init()
        states = {n: initial for n in self.names}
        return states if self.mesh is None else replicate(states, self.mesh)

    def update(self, states: dict, batch, index: int = 0) -> dict:
        """`states` after the batch (`index` names it in errors)."""
        args, kwargs = batch_args(batch)
        args, kwargs = to_jax_tree(args), to_jax_tree(kwargs)
        if self.mesh is not None:
            args, kwargs = shard_batch((args, kwargs), self.mesh, where=f"calib_data batch {index}")
        return self._step(*self._params, states, args, kwargs)


def observe_inputs(
    model: nn.Module, quantizers: dict, batches, observer: jaxq.Observer, mesh=None, progress: Callable | None = None
) -> dict:
    """Observer state of every layer in `quantizers` over `batches` (pairs `(index, batch)`),
    computed by the lowered model, data-parallel over `mesh` when given."""
    functional = [n for n, q in quantizers.items() if getattr(q, "functional", False)]
    if functional:
        raise LoweringError(
            f"layers {functional[:3]} are used functionally (attention's packed projections); the JAX "
            "model taps module inputs only — calibrate without a mesh, or keep them float (disable_names)"
        )
    run: InputObserver | None = None
    states = None
    for index, batch in batches:
        if run is None:
            smoothing = {
                n: along_channels(q.smoothing.cpu().numpy(), q.weight_ndim)
                for n, q in quantizers.items()
                if getattr(q, "smoothing", None) is not None
            }
            run = InputObserver(model, list(quantizers), batch, observer, mesh, smoothing)
            states = run.init()
        states = run.update(states, batch, index)
        if progress is not None:
            progress()
    if run is None:
        from bridge.capture.data import CalibrationDataError

        raise CalibrationDataError("calib_data yielded no batch; give at least one batch")
    return {n: jax.tree.map(np.asarray, s) for n, s in states.items()}
