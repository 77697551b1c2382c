"""Meshes for jaxq: the batch axis of calibration data and the layer axis of buckets.

jaxq uses JAX's own engine (`jax.sharding`, `jax.distributed`); nothing here
communicates by itself. Two placements:

- **data**: a calibration batch split along its first axis over the mesh axis `data`,
  parameters and observer states replicated. A program written for the whole batch is
  partitioned by `jit` (GSPMD); its reductions are combined across devices by XLA.
- **layers**: a stacked bucket `[layers, …]` split along the layer axis; each device runs
  the layer-vectorised function on its own layers (`shard_map`), no communication.

Several processes (`jax.distributed.initialize`, see README): every process builds the
same global mesh and passes its own part of each batch (`shard_batch`); the results come
back replicated, identical in every process.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"

_LAYER_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jaxq_layer_mesh", default=None)


class ShardingError(ValueError):
    """Data that cannot be split over the mesh as asked."""


def data_mesh(devices=None, axis: str = DATA) -> Mesh:
    """A one-axis mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ShardingError("data_mesh: no devices given")
    return Mesh(np.array(devices), (axis,))


def check_mesh(mesh) -> Mesh:
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise ShardingError(f"mesh={mesh!r}: expected a one-axis jax.sharding.Mesh (jaxq.sharding.data_mesh())")
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Every leaf on every device of `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree, mesh: Mesh, where: str = "batch"):
    """Every array leaf split along its first axis over `mesh` (this process's part of the
    global batch when several processes share the mesh); scalars replicated.

    `ShardingError` (naming `where`, the leaf's shape and the device count) when a first
    axis does not divide evenly over this process's devices."""
    axis = mesh.axis_names[0]
    split = NamedSharding(mesh, PartitionSpec(axis))
    local = len(mesh.local_devices)

    def place(leaf):
        a = np.asarray(leaf)
        if a.ndim == 0:
            return jax.device_put(a, replicated(mesh))
        if a.shape[0] % local:
            raise ShardingError(
                f"{where}: an input of shape {a.shape} cannot be split over {local} devices of this "
                f"process along its first axis; give batches whose size is a multiple of {local}"
            )
        return jax.make_array_from_process_local_data(split, a)

    return jax.tree.map(place, tree)


# --- the layer axis --------------------------------------------------------------------------


@contextlib.contextmanager
def layers_over(mesh: Mesh | None):
    """Inside this block, `over_layers` runs buckets with their layer axis split over `mesh`."""
    token = _LAYER_MESH.set(None if mesh is None else check_mesh(mesh))
    try:
        yield mesh
    finally:
        _LAYER_MESH.reset(token)


def layer_mesh() -> Mesh | None:
    return _LAYER_MESH.get()


def over_layers(fn: Callable, stacked):
    """`fn(stacked)` for a layer-vectorised `fn` (layers independent along the leading
    axis). Under `layers_over(mesh)` with more than one device, the layer axis is padded
    (repeating the last layer) to a multiple of the device count, split over the mesh,
    and each device runs `fn` on its own layers; the padding is dropped. Per-layer
    results equal the one-device ones (the same function on each layer)."""
    mesh = layer_mesh()
    if mesh is None or mesh.size == 1:
        return fn(stacked)
    n = jax.tree.leaves(stacked)[0].shape[0]
    size = -(-n // mesh.size) * mesh.size
    padded = jax.tree.map(lambda a: _pad_first(np.asarray(a), size), stacked)
    spec = PartitionSpec(mesh.axis_names[0])
    placed = jax.device_put(padded, NamedSharding(mesh, spec))
    out = _sharded(fn, mesh)(placed)
    return jax.tree.map(lambda a: a[:n], out)


def _pad_first(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], size - a.shape[0], axis=0)])


@functools.lru_cache(maxsize=256)
def _sharded_cached(fn, mesh):
    spec = PartitionSpec(mesh.axis_names[0])
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def _sharded(fn, mesh):
    try:
        return _sharded_cached(fn, mesh)
    except TypeError:  # an unhashable callable: not cached
        return _sharded_cached.__wrapped__(fn, mesh)


class bind:  # noqa: N801 — used like functools.partial
    """`fn` with keyword arguments fixed, hashable by value (so `over_layers` compiles a
    sharded program once per function and settings, not once per call)."""

    __slots__ = ("fn", "kwargs")

    def __init__(self, fn: Callable, **kwargs):
        self.fn, self.kwargs = fn, tuple(sorted(kwargs.items()))

    def __call__(self, *args):
        return self.fn(*args, **dict(self.kwargs))

    def __eq__(self, other):
        return isinstance(other, bind) and (self.fn, self.kwargs) == (other.fn, other.kwargs)

    def __hash__(self):
        return hash((self.fn, self.kwargs))
