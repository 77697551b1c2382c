"""Model-level studies in one compiled program each (the torch loops they replace are in
`bridge.sensitivity`).

- `isolated_sensitivity`: every layer's model-output distance from float with only that
  layer quantized — `vmap` over one-hot switches, in a few programs of consecutive
  layers whose variants share the float prefix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bridge.jax_model.collate import merge_batches
from bridge.jax_model.lower import to_jax_tree
from bridge.jax_model.quantized import QuantizedForward
from jaxq.model_metrics import sample_distances
from jaxq.model_quant import Switches


def primary(out):
    """The array a model-level metric compares (the output, `last_hidden_state`, or the first leaf)."""
    if isinstance(out, dict):
        return out["last_hidden_state"] if "last_hidden_state" in out else primary(next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        return primary(out[0])
    return out


def _programs(qf: QuantizedForward, chunk: int):
    """(float forward, one-hot study), jitted once per quantized forward and chunk."""
    key = ("isolated", chunk)
    if key not in qf.programs:
        qf.programs[key] = _make_programs(qf.fn, chunk)
    return qf.programs[key]


def _make_programs(fn, chunk: int):
    def forward(params, buffers, state, switches, args, kwargs):
        return primary(fn(params, buffers, state, switches, args, kwargs))

    def study(params, buffers, state, base: Switches, args, kwargs, fp, mask):
        n = base.weight.shape[0]
        eye = jnp.eye(n, dtype=jnp.float32)

        def one(row):
            sw = Switches(row * base.weight, row * base.input)
            return jnp.mean(sample_distances(fp, forward(params, buffers, state, sw, args, kwargs), mask))

        return jax.lax.map(one, eye, batch_size=chunk)

    return jax.jit(forward), jax.jit(study)


def _segment_program(qf: QuantizedForward, lo: int, hi: int):
    """Isolated variants of layers `lo … hi−1` in one `vmap`: the switches of the other
    layers are constants, so everything before layer `lo` (in call order) is computed
    once for all variants instead of once per variant."""
    key = ("isolated-segment", lo, hi)
    if key in qf.programs:
        return qf.programs[key]
    n, fn = len(qf.layers), qf.fn

    def study(params, buffers, state, base_w, base_in, args, kwargs, fp, mask):
        def one(onehot):
            zero = jnp.float32(0.0)
            w = tuple(onehot[i - lo] * base_w[i] if lo <= i < hi else zero for i in range(n))
            x = tuple(onehot[i - lo] * base_in[i] if lo <= i < hi else zero for i in range(n))
            out = primary(fn(params, buffers, state, Switches(w, x), args, kwargs))
            return jnp.mean(sample_distances(fp, out, mask))

        return jax.vmap(one)(jnp.eye(hi - lo, dtype=jnp.float32))

    qf.programs[key] = jax.jit(study)
    return qf.programs[key]


def _segments(n: int, programs: int) -> list[tuple[int, int]]:
    """`programs` contiguous ranges covering `0 … n−1` that minimise the work, in forwards,
    `Σ [a/n + (b − a)(1 − a/n)]` over ranges `[a, b)` (the shared prefix once, then every
    variant from `a` on): early ranges come out short, late ones long."""
    programs = max(1, min(programs, n))
    cost = lambda a, b: a / n + (b - a) * (1 - a / n)  # noqa: E731
    best = np.full((programs + 1, n + 1), np.inf)
    cut = np.zeros((programs + 1, n + 1), int)
    best[0, 0] = 0.0
    for p in range(1, programs + 1):
        for b in range(1, n + 1):
            for a in range(p - 1, b):
                c = best[p - 1, a] + cost(a, b)
                if c < best[p, b]:
                    best[p, b], cut[p, b] = c, a
    edges, b = [n], n
    for p in range(programs, 0, -1):
        b = cut[p, b]
        edges.append(b)
    edges = edges[::-1]
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def isolated_sensitivity(qf: QuantizedForward, batches, chunk: int = 4, programs: int | None = 8) -> dict[str, float]:
    """Per quantized layer: mean per-sample distance (KL for logits, `1 − cos` otherwise)
    of the model output from float with only that layer quantized, over `batches`.

    `programs=P` (default 8): the layers in `P` contiguous groups, one program each, whose
    variants share the float computation before the group (about half the work of one
    program per variant; `P` compilations per input shape). `programs=None`: one program,
    `chunk` variants side by side (`lax.map(batch_size=chunk)`)."""
    forward, study = _programs(qf, chunk)
    lw, base = qf.lowered, qf.default_switches()
    off = Switches(jnp.zeros_like(base.weight), jnp.zeros_like(base.input))
    total, count = np.zeros(len(qf.layers)), 0
    for merged in merge_batches(list(batches)):
        args, kwargs = to_jax_tree(merged.batch.args), to_jax_tree(merged.batch.kwargs)
        mask = None if merged.token_mask is None else jnp.asarray(merged.token_mask.numpy())
        fp = forward(lw.params, lw.buffers, qf.state, off, args, kwargs)
        n = fp.shape[0]
        if programs is None:
            total += n * np.asarray(study(lw.params, lw.buffers, qf.state, base, args, kwargs, fp, mask))
        else:
            for lo, hi in _segments(len(qf.layers), programs):
                seg = _segment_program(qf, lo, hi)
                total[lo:hi] += n * np.asarray(seg(lw.params, lw.buffers, qf.state, base.weight, base.input, args, kwargs, fp, mask))
        count += n
    return dict(zip(qf.names, (total / max(count, 1)).tolist()))
