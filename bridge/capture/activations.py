"""Streaming capture of layer-input statistics with forward pre-hooks.

Small inputs: a hook only copies its layer's input, flattened, into a power-of-two
buffer (so batches of varying shape reuse one compilation). The observer updates of
every layer that ran are then applied at the end of each batch in one jitted call
(`jaxq.update_observers`): on CPU a separate XLA call per layer costs more in thread-pool
overhead than the reduction itself. That program is compiled for the first batch's
sequence of buffer sizes; a batch with other sizes (text of varying length) is applied
one call per buffer size (`jaxq.update_stacked_observers`, the update traced once under
`vmap` over the layers' stacked states), so new lengths add small programs instead of
re-tracing every layer. The layers of one buffer size are the same from batch to batch
(a transformer's projections of one width), so their states stay stacked between
batches (`_Row`): unstacking and restacking them cost more than the update itself.

Large inputs (more than `IN_PLACE_MIN` float32 values on CPU): the hook updates the
layer's state at once, reading the activation in place through a zero-copy view —
copying and padding them was half the cost of calibrating a CNN. Below `IN_PLACE_MIN` one
batched call for every layer costs less than a call per layer in its hook. The view is exact-size
(any size: the observers read a partial last row apart, `jaxq.observers.row_parts`),
so each size compiles its own update; a layer whose large inputs come in more than
`IN_PLACE_SIZES` sizes (variable-length text, say) is copied into buckets from then on.
The hook blocks until its update is done, so torch may reuse the memory afterwards.

Layers fed the very same tensor in a row (a transformer's query, key and value
projections) with equal states share one update: the first is computed, the others take
its result (`_SharedInput`).

Only the fixed-shape observer states persist; at most one batch of activations per
layer is held at a time, and less once `max_pending` is reached (the pending updates
then run early and their buffers are reused).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import numpy as np
import torch
from torch import nn

import jaxq
from jaxq import observer_choice
from bridge.capture.tensors import layer_input, to_jax
from jaxq.calibrate import stack_states
from jaxq.observers import ROW

MIN_BUCKET = 1024
MAX_PENDING = 1 << 26  # floats (256 MiB) of captured inputs waiting for their update
NUMPY_COPY_MAX = 1 << 18  # floats; above this torch's two-thread copy is faster
IN_PLACE_MIN = 1 << 21  # floats; larger CPU float32 inputs are observed without a copy (`docs/calibration.md`)
IN_PLACE_SIZES = 2  # distinct in-place sizes per layer (one compile each), then buckets


class NonFiniteActivationError(FloatingPointError):
    """A captured activation contains NaN or Inf."""


def bucket_size(n: int) -> int:
    """Smallest size ≥ n (at least `MIN_BUCKET`) of the form `2^k·m/4`, `m ∈ {4, 5, 6, 7}`,
    and a multiple of `ROW`: at most 25 % padding (≤ 100 % with powers of two), for a few
    more compilations on inputs whose size varies (text)."""
    n = max(n, MIN_BUCKET)
    power = 1 << math.ceil(math.log2(n))
    quarter = power // 8  # candidates between power/2 and power
    return next(s for s in (5 * quarter, 6 * quarter, 7 * quarter, power) if s >= n and s % ROW == 0)


def _fill(buf: torch.Tensor, array: np.ndarray, x: torch.Tensor) -> int:
    """Copy `x` flattened into `buf` (`array` is its NumPy view); the tail repeats `x`'s
    first entry (the observers' padding contract). Returns the number of valid entries.

    float32 CPU inputs go through NumPy: a single-threaded memcpy, where torch's `copy_`
    of a mid-sized tensor pays an OpenMP fork/join that costs more than the copy."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and n <= NUMPY_COPY_MAX:
        src = flat.numpy()
        array[:n] = src
        array[n:] = src[0] if n else 0.0
    else:
        buf[:n].copy_(flat)
        buf[n:].fill_(float(flat[0]) if n else 0.0)
    return n


class BufferPool:
    """Reusable padded buffers, each with its zero-copy JAX view.

    `fill` hands out a free buffer of the right size (allocating one only when all are
    taken); `release` returns every buffer at once. Reuse avoids page faults of fresh
    allocations and a DLPack import per call. A view aliases memory that the next
    `fill` after `release` overwrites, so a caller must finish (block on) every
    computation that reads the views before releasing — `ActivationCapture` does.
    """

    def __init__(self):
        self._free: dict[int, list[tuple[torch.Tensor, np.ndarray, jax.Array]]] = {}
        self._taken: list[tuple[int, tuple[torch.Tensor, np.ndarray, jax.Array]]] = []

    def fill(self, x: torch.Tensor) -> tuple[jax.Array, int]:
        size = bucket_size(x.numel())
        free = self._free.setdefault(size, [])
        if free:
            entry = free.pop()
        else:
            buf = torch.empty(size, dtype=torch.float32)
            entry = (buf, buf.numpy(), to_jax(buf))
        self._taken.append((size, entry))
        n = _fill(*entry[:2], x)
        return entry[2], n

    def release(self) -> None:
        for size, entry in reversed(self._taken):  # reversed: the next batch takes them in the same order
            self._free[size].append(entry)
        self._taken.clear()


# the choice of observer lives in jaxq; these names stay for existing imports
observer_for, histogram_observer_for = observer_choice.observer_for, observer_choice.histogram_observer_for


class _SharedInput(NamedTuple):
    """The last input a hook saw: a later layer fed the same tensor (unchanged: same
    `_version`) whose state is `state_before` gets `leader`'s updated state. Holding `x`
    keeps its id from being reused by another tensor."""

    x: torch.Tensor
    version: int
    state_before: object
    leader: str


class _Row:
    """A layer's state as row `index` of a group's states stacked along a leading layer
    axis (`jaxq.calibrate.stack_states`), as `jaxq.update_stacked_observers` returned them."""

    __slots__ = ("stacked", "index", "size")

    def __init__(self, stacked, index: int, size: int):
        self.stacked, self.index, self.size = stacked, index, size

    def state(self):
        return jax.tree.map(lambda a: np.asarray(a)[self.index], self.stacked)


def _stacked(rows: list) -> object | None:
    """The stacked states `rows` are, in order, if they are one whole group; else None."""
    first = rows[0]
    if not isinstance(first, _Row) or first.size != len(rows):
        return None
    if all(isinstance(r, _Row) and r.stacked is first.stacked and r.index == i for i, r in enumerate(rows)):
        return first.stacked
    return None


class ActivationCapture:
    """Stream layer inputs into observer states (`layers`: `LayerQuantizer`s or modules).

    Inputs wait in the buffer pool until `flush()` (called after every batch, and on
    exit) applies all their updates (see the module docstring for the programs). A layer that runs twice in one
    forward pass, or pending inputs beyond `max_pending` floats, flush early.
    """

    def __init__(self, layers: dict[str, nn.Module], observer: jaxq.Observer, max_pending: int = MAX_PENDING):
        self.observer = observer
        # immutable arrays: every layer may share them. Committed to the CPU device like the
        # updates' results and the DLPack views, so the first batch's call compiles the very
        # program later batches use (an uncommitted state is another cache key: two compiles)
        initial = jax.device_put(observer.init(), jax.devices("cpu")[0])
        self._states: dict[str, object] = {name: initial for name in layers}  # a state or a `_Row`
        self.max_pending = max_pending
        self._layers = layers
        self._handles: list = []
        self._pool = BufferPool()
        self._pending: dict[str, tuple[jax.Array, int]] = {}
        self._in_place_sizes: dict[str, set[int]] = {name: set() for name in layers}
        self._last: _SharedInput | None = None
        self._followers: dict[str, str] = {}  # layer → pending leader whose state it takes
        self._first_pattern: tuple | None = None  # the first flush's (layer, buffer size) sequence

    @property
    def states(self) -> dict[str, object]:
        """Every layer's observer state; layers that share one state object share it here."""
        resolved: dict[int, object] = {}
        out = {}
        for name, s in self._states.items():
            if id(s) not in resolved:
                resolved[id(s)] = s.state() if isinstance(s, _Row) else s
            out[name] = resolved[id(s)]
        return out

    def _state(self, name: str):
        s = self._states[name]
        return s.state() if isinstance(s, _Row) else s

    def _hook(self, name: str) -> Callable:
        def hook(_module, args, kwargs=None):
            observe(layer_input(args, kwargs))

        def observe(x: torch.Tensor) -> None:
            if name in self._pending or name in self._followers:  # keep this layer's updates in order
                self.flush()
            if self._follows_last(name, x):
                return
            self._last = _SharedInput(x, x._version, self._states[name], name)
            if self._in_place(name, x):
                self._update_now(name, x)
                return
            if self._pending_floats() + x.numel() > self.max_pending:
                self.flush()
            self._pending[name] = self._pool.fill(x)

        return observe if hasattr(self._layers[name], "listeners") else hook

    def _follows_last(self, name: str, x: torch.Tensor) -> bool:
        """Share the last input's update if `x` is that tensor, unchanged, and `name`'s
        state equals the leader's state before it (then their updates are identical)."""
        last = self._last
        if last is None or x is not last.x or x._version != last.version or self._states[name] is not last.state_before:
            return False
        if last.leader in self._pending:
            self._followers[name] = last.leader
        else:
            self._states[name] = self._states[last.leader]
        return True

    def _in_place(self, name: str, x: torch.Tensor) -> bool:
        """Whether `x` is observed through a zero-copy view (see the module docstring);
        a new large size is recorded while the layer has fewer than `IN_PLACE_SIZES`."""
        n = x.numel()
        if x.device.type != "cpu" or x.dtype != torch.float32 or n <= IN_PLACE_MIN:
            return False
        sizes = self._in_place_sizes[name]
        if n not in sizes and len(sizes) < IN_PLACE_SIZES:
            sizes.add(n)
        return n in sizes

    def _update_now(self, name: str, x: torch.Tensor) -> None:
        view = to_jax(x.detach().reshape(-1))
        state = jaxq.update_observer(self._state(name), view, np.int32(view.shape[0]), self.observer)
        self._states[name] = jax.block_until_ready(state)  # torch may reuse x's memory after the hook

    def _pending_floats(self) -> int:
        return sum(view.shape[0] for view, _ in self._pending.values())

    def _discard(self) -> None:
        """Forget the pending inputs and return their buffers to the pool."""
        self._pending.clear()
        self._followers.clear()
        self._last = None
        self._pool.release()

    def _views(self, names: list[str]) -> tuple[tuple, np.ndarray]:
        return tuple(self._pending[n][0] for n in names), np.array([self._pending[n][1] for n in names], np.int32)

    def _update_pattern(self, names: list[str]) -> list:
        """The first batch's sequence of buffer sizes: one program for every layer."""
        new = jaxq.update_observers(tuple(self._state(n) for n in names), *self._views(names), self.observer)
        self._states.update(zip(names, new))
        return list(new)

    def _update_size(self, names: list[str]) -> list:
        """Layers with buffers of one size: one vmapped program over their stacked states,
        which stay stacked for the next batch that has the same group."""
        stacked = _stacked([self._states[n] for n in names])
        if stacked is None:
            stacked = stack_states([self._state(n) for n in names])
        new = jaxq.update_stacked_observers(stacked, *self._views(names), self.observer)
        self._states.update({n: _Row(new, i, len(names)) for i, n in enumerate(names)})
        return [new]

    def flush(self) -> None:
        """Apply every pending input to its layer's state (see the module docstring for
        the programs); forget the last input (no tensor outlives its batch)."""
        if self._pending:
            pattern = tuple((n, view.shape[0]) for n, (view, _) in self._pending.items())
            if self._first_pattern is None:
                self._first_pattern = pattern
            if pattern == self._first_pattern:  # fixed shapes: one program for every batch
                results = self._update_pattern(list(self._pending))
            else:  # sizes vary: one small program per buffer size, not one per sequence of sizes
                by_size: dict[int, list[str]] = {}
                for name, size in pattern:
                    by_size.setdefault(size, []).append(name)
                results = [r for names in by_size.values() for r in self._update_size(names)]
            jax.block_until_ready(results)  # the pool reuses the views' memory
            self._states.update({f: self._states[leader] for f, leader in self._followers.items()})
        self._discard()

    def __enter__(self):
        for name, layer in self._layers.items():
            self._handles.append(listen(layer, self._hook(name)))
        return self

    def __exit__(self, *exc):
        for remove in self._handles:
            remove()
        self._handles.clear()
        if exc[0] is None:
            self.flush()
        else:  # the forward failed: drop what it captured
            self._discard()
        return False


def listen(layer, fn: Callable) -> Callable[[], None]:
    """Call `fn` with every input of `layer` (a `LayerQuantizer`: at whichever point it
    taps its input; a plain module: a forward pre-hook). Returns the remover."""
    if hasattr(layer, "listeners"):
        layer.listeners.append(fn)
        return lambda: layer.listeners.remove(fn)
    return layer.register_forward_pre_hook(fn, with_kwargs=True).remove


def check_finite(results: dict[str, jaxq.ActivationResult]) -> None:
    """Raise naming the first layer (and batch) whose captured input was not finite."""
    for name, r in results.items():
        bad = int(np.asarray(r.first_bad))
        if bad >= 0:
            raise NonFiniteActivationError(
                f"layer {name!r}: its input in calib_data batch {bad} contains NaN or Inf; "
                "check the data or the preceding layers"
            )
