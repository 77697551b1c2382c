"""Model-level studies in one compiled program each (the torch loops they replace are in
`bridge.studies.sensitivity`).

- `isolated_sensitivity`: every layer's model-output distance from float with only that
  layer quantized, in one program: the float forward once, then the layers in groups of
  consecutive ones, each group's variants under one `vmap` of one-hot switches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bridge.jax_model.collate import as_batches, merge_batches
from bridge.jax_model.lower import to_jax_tree
from bridge.jax_model.quantized import QuantizedForward
from jaxq.model_metrics import sample_distances
from jaxq.model_quant import Switches
from jaxq.sharding import check_mesh, replicate, shard_batch


def primary(out):
    """The array a model-level metric compares (the output, `last_hidden_state`, or the first leaf)."""
    if isinstance(out, dict):
        return out["last_hidden_state"] if "last_hidden_state" in out else primary(next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        return primary(out[0])
    return out


def layer_groups(n: int, groups: int) -> list[tuple[int, int]]:
    """`0 … n−1` in at most `groups` contiguous ranges of equal length (the last may be shorter)."""
    size = -(-n // max(1, min(groups, n)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _study_program(qf: QuantizedForward, groups: int):
    """Why groups: a variant computes the same float values as every other variant up to
    its layer. In a group `[lo, hi)` the other layers' switches are constants, so the
    forward before layer `lo` (in call order) does not depend on the vmapped switches and
    is computed once; XLA then merges the identical float prefixes of all groups and the
    float reference into one computation. Work: about `Σ_g |g|·(1 − lo_g/n)` forwards
    instead of `n`, for one compilation (finer groups: less work, longer compile)."""
    key = ("isolated", groups)
    if key in qf.programs:
        return qf.programs[key]
    n, fn = len(qf.layers), qf.fn
    zero = jnp.float32(0.0)

    def study(params, buffers, state, base_w, base_in, args, kwargs, mask):
        off = tuple(zero for _ in range(n))
        fp = primary(fn(params, buffers, state, Switches(off, off), args, kwargs))

        def group(lo, hi):
            def one(onehot):
                w = tuple(onehot[i - lo] * base_w[i] if lo <= i < hi else zero for i in range(n))
                x = tuple(onehot[i - lo] * base_in[i] if lo <= i < hi else zero for i in range(n))
                out = primary(fn(params, buffers, state, Switches(w, x), args, kwargs))
                return jnp.mean(sample_distances(fp, out, mask))

            return jax.vmap(one)(jnp.eye(hi - lo, dtype=jnp.float32))

        return jnp.concatenate([group(lo, hi) for lo, hi in layer_groups(n, groups)])

    qf.programs[key] = jax.jit(study)
    return qf.programs[key]


def isolated_sensitivity(qf: QuantizedForward, batches, groups: int = 16, mesh=None) -> dict[str, float]:
    """Per quantized layer: mean per-sample distance (KL for logits, `1 − cos` otherwise)
    of the model output from float with only that layer quantized, over `batches`.

    One program per merged input shape (`bridge.jax_model.collate`); `groups`: how many
    ranges of consecutive layers it vmaps separately (see `_study_program`). `mesh`: the
    samples split over its devices (`jaxq.sharding.shard_batch`), weights replicated."""
    study = _study_program(qf, groups)
    lw, base = qf.lowered, qf.default_switches()
    fixed = (lw.params, lw.buffers, qf.state, base.weight, base.input)
    if mesh is not None:
        fixed = replicate(fixed, check_mesh(mesh))
    total, count = np.zeros(len(qf.layers)), 0
    for i, merged in enumerate(merge_batches(as_batches(batches))):
        args, kwargs = to_jax_tree(merged.batch.args), to_jax_tree(merged.batch.kwargs)
        mask = None if merged.token_mask is None else jnp.asarray(merged.token_mask.numpy())
        n = _batch_size(args, kwargs)
        if mesh is not None:
            args, kwargs, mask = shard_batch((args, kwargs, mask), mesh, where=f"sensitivity batch {i}")
        total += n * np.asarray(study(*fixed, args, kwargs, mask))
        count += n
    return dict(zip(qf.names, (total / max(count, 1)).tolist()))


def _batch_size(args, kwargs) -> int:
    leaves = [leaf for leaf in jax.tree_util.tree_leaves((args, kwargs)) if jnp.ndim(leaf) > 0]
    return int(leaves[0].shape[0]) if leaves else 1
