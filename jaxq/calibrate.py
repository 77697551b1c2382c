"""Vectorised calibration: one `jit(vmap(...))` per bucket of equal-shaped layers.

A bucket is every layer whose array (weight, or observer state) has the same shape and
dtype under the same scheme. `quantize_weights` and `finalize_activations` stack a
bucket, run one compiled function over the layer axis, and split the result, so a model
compiles about once per bucket and a second run with the same shapes compiles nothing.

    weights:      (lo_c, hi_c) = per-channel range of W (`jaxq.weight_range`);  QParams ← range;  q = quantize(W)
    activations:  (lo, hi) = observer.finalize(state);      QParams ← range
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Hashable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.host import aligned_empty, aligned_stack
from jaxq.executables import cached_jit
from jaxq.padding import bucket_size, power_of_two

from jaxq.numerics import quantize
from jaxq.observers import Observer
from jaxq.qparams import QParams, qparams_from_range
from jaxq.scheme import QScheme
from jaxq.sharding import bind, over_layers
from jaxq.weight_range import channel_range


class QuantizedWeight(NamedTuple):
    """Per-channel `QParams` and the integer weight `q` with `W ≈ (q − o)·s`."""

    qparams: QParams
    q: jax.Array


def bucket_keys(
    arrays: Mapping[str, object], key=lambda a: (tuple(np.shape(a)), str(a.dtype))
) -> dict[Hashable, list[str]]:
    """Group names by the shape and dtype of their array (insertion order kept)."""
    buckets: dict[Hashable, list[str]] = defaultdict(list)
    for name, a in arrays.items():
        buckets[key(a)].append(name)
    return dict(buckets)


def quantize_weight(w: jax.Array, scheme: QScheme, weight_range: str = "minmax") -> QuantizedWeight:
    """Round-to-nearest per-channel quantization of one weight tensor (axis `scheme.axis`,
    default 0) on the channel ranges of `weight_range` (`jaxq.weight_range`)."""
    moved = jnp.moveaxis(jnp.asarray(w, jnp.float32), scheme.axis or 0, 0)
    lo, hi = channel_range(jnp.reshape(moved, (moved.shape[0], -1)), scheme, weight_range)
    qp = qparams_from_range(lo, hi, scheme)
    return QuantizedWeight(qp, quantize(w, qp))


@cached_jit(static_argnames=("scheme", "weight_range"))
def quantize_weight_bucket(ws: jax.Array, scheme: QScheme, weight_range: str = "minmax") -> QuantizedWeight:
    """`quantize_weight` over a stacked bucket `ws: [layers, *shape]`."""
    return jax.vmap(lambda w: quantize_weight(w, scheme, weight_range))(ws)


def stack_states(trees: list) -> object:
    """Stack pytrees (layer states, weights) along a new leading layer axis on the host (one
    tree: a view, no copy), into aligned buffers that compiled calls read in place
    (`jaxq.host`)."""
    if len(trees) == 1:
        return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], trees[0])
    return jax.tree_util.tree_map(lambda *leaves: aligned_stack(leaves), *trees)


def unstack_states(stacked, count: int) -> list:
    """`stack_states` undone on the host: `count` trees of NumPy views (eager device slicing
    would compile per index)."""
    host = jax.tree_util.tree_map(np.asarray, stacked)
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], host) for i in range(count)]


def _unstack(tree, names: list[str]) -> dict[str, object]:
    return dict(zip(names, unstack_states(tree, len(names))))


WEIGHT_CALL_FLOATS = 1 << 22  # weight values per compiled call of `quantize_weights` (16 MiB)
MAX_CALL_ROWS = 4096


def weight_rows_per_call(k: int) -> int:
    """Rows of width `k` per call: a power of two, `8 … MAX_CALL_ROWS`, within `WEIGHT_CALL_FLOATS`."""
    fit = max(WEIGHT_CALL_FLOATS // max(k, 1), 8)
    return int(min(1 << (fit.bit_length() - 1), MAX_CALL_ROWS))


def map_rows(fn, inputs: Mapping[str, tuple], width_of=bucket_size) -> dict[str, tuple]:
    """`fn` over the rows of many layers with one compiled program per row width.

    `inputs[name]`: a tuple of a layer's arrays with one row axis first — matrices `[R, K]`
    and vectors `[R]`. `fn(chunk)` maps such a tuple of `[rows, …]` arrays to a pytree of
    `[rows]` or `[rows, width]` arrays and must treat every row on its own. The rows of all
    layers whose matrices have one padded width (`K` zero-padded to `width_of(K)`, a size
    bucket by default) are packed together, `weight_rows_per_call` rows per call (fewer
    rows: the power of two that holds them), the last call padded with zero rows (under
    `layers_over(mesh)` calls split over the devices); each layer gets its rows back,
    matrices cut to its own `K`. Returns `{name: fn's leaves}`."""
    k_of = {n: next(a.shape[1] for a in arrays if np.ndim(a) == 2) for n, arrays in inputs.items()}
    by_width: dict[int, list[str]] = defaultdict(list)
    for n, k in k_of.items():
        by_width[width_of(k)].append(n)
    out: dict[str, tuple] = {}
    for width, names in by_width.items():
        counts = [np.shape(inputs[n][0])[0] for n in names]
        starts = np.cumsum([0] + counts)
        per_call = min(weight_rows_per_call(width), power_of_two(int(starts[-1]), 8))  # few rows: a small call
        parts: dict[str, list[tuple]] = {n: [] for n in names}
        # one call's rows at a time, in one reused buffer per input: packing every row of the
        # width at once, and joining the results, allocated (and page-faulted) as much again
        chunk = [
            aligned_empty((per_call, width) if np.ndim(a) == 2 else (per_call,), np.asarray(a).dtype)
            for a in inputs[names[0]]
        ]
        for first in range(0, int(starts[-1]), per_call):
            last = first + per_call
            layers = [(n, lo, lo + c) for n, lo, c in zip(names, starts, counts) if lo < last and lo + c > first]
            for i, buf in enumerate(chunk):
                buf[...] = 0
                for n, lo, hi in layers:
                    x = np.asarray(inputs[n][i])[max(first - lo, 0) : min(last, hi) - lo]
                    at = max(lo - first, 0)
                    buf[(slice(at, at + x.shape[0]), *(slice(0, k) for k in x.shape[1:]))] = x
            leaves = [np.asarray(y)[0] for y in jax.tree.leaves(over_layers(fn, tuple(a[None] for a in chunk)))]
            for n, lo, hi in layers:  # np.asarray waited for the call: the buffers may be refilled
                rows = slice(max(lo - first, 0), min(last, hi) - first)
                parts[n].append(tuple(y[rows, : k_of[n]] if y.ndim == 2 else y[rows] for y in leaves))
        for n in names:
            out[n] = parts[n][0] if len(parts[n]) == 1 else tuple(np.concatenate(p) for p in zip(*parts[n]))
    return out


def quantize_weights(
    weights: Mapping[str, jax.Array], scheme: QScheme, weight_range: str = "minmax"
) -> dict[str, QuantizedWeight]:
    """Quantize many weights with one compiled program per row width: per-channel
    quantization treats every row of a weight's `[out, K]` matrix on its own, so rows of
    all weights of one padded width are quantized together (`map_rows`). Zeros change no
    per-channel range (symmetric scales use `max|w|`; asymmetric ranges include 0 anyway)
    and cost no rounding error (0 is on every grid), so the result is that of
    `quantize_weight` on each weight, bit for bit under `"minmax"` (under `"mse"` the
    error sums may round differently by an ulp, which can only matter at a tie)."""
    fn = bind(_quantize_rows, scheme=scheme.with_axis(0), weight_range=weight_range)
    # min-max reads a padded entry once, the mse search at every step
    width_of = power_of_two if weight_range == "minmax" else bucket_size
    done = map_rows(fn, {n: (np.asarray(w).reshape(np.shape(w)[0], -1),) for n, w in weights.items()}, width_of)
    out = {}
    for n, w in weights.items():
        scale, offset, q = done[n]  # the leaves of QuantizedWeight(QParams(scale, offset), q)
        out[n] = QuantizedWeight(QParams(scale, offset, scheme), q.reshape(np.shape(w)))
    return out


def _quantize_rows(chunk, scheme: QScheme, weight_range: str) -> QuantizedWeight:
    return quantize_weight_bucket(chunk[0], scheme, weight_range)


@cached_jit(static_argnames=("observer",))
def update_observer(state, x: jax.Array, n_valid: jax.Array, observer: Observer):
    """One streaming observer step, compiled once per (observer, buffer size)."""
    return observer.update(state, x, n_valid)


@cached_jit(static_argnames=("observer",))
def update_observers(states: tuple, xs: tuple, n_valid: jax.Array, observer: Observer) -> tuple:
    """`update_observer` for many layers in one compiled call: `states[i] ← update(states[i],
    xs[i], n_valid[i])`. Compiled once per sequence of buffer sizes.

    On CPU every XLA call pays a fixed thread-pool cost (~0.3 ms on 2 cores, more than
    reducing 50k values), so one call per batch instead of one per layer is what keeps
    calibration near the float forward time on models with many small layers.
    """
    update = _traced_once(observer)
    return tuple(update(s, x, n_valid[i]) for i, (s, x) in enumerate(zip(states, xs)))


@functools.lru_cache(maxsize=64)
def _traced_once(observer: Observer):
    """`observer.update` under its own `jit`: inside a program, layers of one buffer size
    share one trace and one lowering (XLA inlines the calls, so the program is the same)."""
    return jax.jit(observer.update)


@cached_jit(static_argnames=("observer",))
def update_stacked_observers(states, xs: tuple, n_valid: jax.Array, observer: Observer):
    """`update_observers` for buffers of one size, on states stacked along a leading layer
    axis (`stack_states`), returning them stacked: the update is traced once under `vmap`
    and compiled once per (buffer size, number of layers). Stacked, the states are one
    argument and one result per leaf instead of per layer and leaf, which is what made
    compilation grow with the number of layers."""
    if len({x.shape for x in xs}) != 1:
        raise ValueError(f"update_stacked_observers takes buffers of one size, got {sorted({x.shape[0] for x in xs})}")
    return jax.vmap(observer.update)(states, jnp.stack(xs), n_valid)


def update_observers_of_size(states: tuple, xs: tuple, n_valid, observer: Observer) -> tuple:
    """`update_observers` for buffers of one size through `update_stacked_observers`: for
    batches whose sizes vary (text), where one program per sequence of sizes would trace
    every layer's update again for each new sequence. Returns the states as NumPy views."""
    if len({np.shape(x) for x in xs}) != 1:
        raise ValueError(f"update_observers_of_size takes buffers of one size, got {sorted({x.shape[0] for x in xs})}")
    stacked = update_stacked_observers(stack_states(states), xs, np.asarray(n_valid, np.int32), observer)
    return tuple(unstack_states(stacked, len(xs)))


class ActivationResult(NamedTuple):
    qparams: QParams
    lo: jax.Array
    hi: jax.Array
    first_bad: jax.Array


@cached_jit(static_argnames=("observer", "scheme"))
def finalize_activation_bucket(states, observer: Observer, scheme: QScheme) -> ActivationResult:
    """Observer ranges → per-tensor `QParams` over a stacked bucket of states."""

    def one(state):
        (lo, hi), first_bad = observer.finalize(state)
        return ActivationResult(qparams_from_range(lo, hi, scheme), lo, hi, first_bad)

    # lax.map one layer at a time: vmap batches the searches' while loops and [B, B] model
    # matrices, measured 2–3× slower on CPU than a sequential map
    return jax.lax.map(one, states)


def finalize_activations(
    states: Mapping[str, object], observer: Observer, scheme: QScheme
) -> dict[str, ActivationResult]:
    """Finalize many observer states, one compiled call per state-shape bucket. Layers that
    hold the very same state object (the bridge shares one between layers fed the same
    input) are finalized once."""
    owner = {}  # id(state) → the first layer holding it
    for n, s in states.items():
        owner.setdefault(id(s), n)
    distinct = {n: states[n] for n in owner.values()}
    out: dict[str, ActivationResult] = {}
    for names in bucket_keys(distinct, tree_key).values():
        stacked = stack_states([distinct[n] for n in names])
        out.update(
            _unstack(over_layers(bind(finalize_activation_bucket, observer=observer, scheme=scheme), stacked), names)
        )
    return {n: out[owner[id(s)]] for n, s in states.items()}


def tree_key(tree) -> Hashable:
    """Bucket key of a pytree: its structure and every leaf's shape and dtype."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), str(np.asarray(a).dtype)) for a in leaves)


def map_buckets(fn, inputs: Mapping[str, object], progress=None, max_bytes: int | None = None) -> dict[str, object]:
    """Apply a compiled, layer-vectorised `fn(stacked) -> stacked` to every bucket of
    equal-structured `inputs` and return the per-name results (input order).

    `max_bytes`: a bucket whose stacked inputs would exceed it runs in slices of as many
    layers as fit (at least one; the same slices every run, so no new compilation).
    `progress(n_layers)` is called after each call (e.g. a tqdm `update`)."""
    out: dict[str, object] = {}
    for names in bucket_keys(inputs, tree_key).values():
        per_call = len(names)
        if max_bytes is not None:
            layer_bytes = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(inputs[names[0]]))
            per_call = max(1, min(per_call, max_bytes // max(layer_bytes, 1)))
        for i in range(0, len(names), per_call):
            part = names[i : i + per_call]
            out.update(_unstack(over_layers(fn, stack_states([inputs[n] for n in part])), part))
            if progress is not None:
                progress(len(part))
    return {n: out[n] for n in inputs}


def compile_count() -> "CompileCounter":
    """Context manager counting the XLA compilations run inside its block (programs loaded
    from JAX's persistent compilation cache are not compilations)."""
    return CompileCounter()


class CompileCounter:
    """`count`: `/jax/core/compile/backend_compile_duration` events (a compilation, or a
    load from the persistent cache) less `/jax/compilation_cache/cache_hits` (the loads)
    while active; `loaded`: the loads."""

    _EVENT = "/jax/core/compile/backend_compile_duration"
    _HIT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.requests = 0
        self.loaded = 0
        self._active = False

    @property
    def count(self) -> int:
        return self.requests - self.loaded

    def _listener(self, event: str, duration: float, **_):
        if self._active and event == self._EVENT:
            self.requests += 1

    def _hit_listener(self, event: str, **_):
        if self._active and event == self._HIT:
            self.loaded += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        jax.monitoring.register_event_listener(self._hit_listener)
        self._active = True
        return self

    def __exit__(self, *exc):
        self._active = False
        for unregister, listener in (
            (jax.monitoring.unregister_event_duration_listener, self._listener),
            (jax.monitoring.unregister_event_listener, self._hit_listener),
        ):
            try:
                unregister(listener)
            except (AttributeError, ValueError):  # older jax: listener stays, but inactive
                pass
        return False
