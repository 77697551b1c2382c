"""Model-level studies in one compiled program each (the torch loops they replace are in
`bridge.sensitivity`).

- `isolated_sensitivity`: every layer's model-output distance from float with only that
  layer quantized — `vmap` over one-hot switches, `lax.map` in chunks to bound memory.
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


def _programs(qf: QuantizedForward, chunk: int, correction: bool):
    """(float forward, one-hot study), jitted once per quantized forward, chunk and mode."""
    key = ("isolated", chunk, correction)
    if key not in qf.programs:
        qf.programs[key] = _make_programs(qf.fn, chunk, correction)
    return qf.programs[key]


def _make_programs(fn, chunk: int, correction: bool):
    def forward(params, buffers, state, switches, args, kwargs, correction=False):
        return primary(fn(params, buffers, state, switches, args, kwargs, correction=correction))

    def study(params, buffers, state, base: Switches, args, kwargs, fp, mask):
        n = base.weight.shape[0]
        eye = jnp.eye(n, dtype=jnp.float32)

        def one(row):
            sw = Switches(row * base.weight, row * base.input)
            return jnp.mean(sample_distances(fp, forward(params, buffers, state, sw, args, kwargs, correction), mask))

        return jax.lax.map(one, eye, batch_size=chunk)

    return jax.jit(forward), jax.jit(study)


def isolated_sensitivity(qf: QuantizedForward, batches, chunk: int = 4, correction: bool = False) -> dict[str, float]:
    """Per quantized layer: mean per-sample distance (KL for logits, `1 − cos` otherwise)
    of the model output from float with only that layer quantized, over `batches`.

    `chunk` one-hot variants run side by side (`lax.map(batch_size=chunk)`): more is
    faster up to memory. `correction=True` keeps the weights unbatched (see
    `QuantizedForward.fn`); measured slower on CPU, kept for memory-bound cases."""
    forward, study = _programs(qf, chunk, correction)
    lw, base = qf.lowered, qf.default_switches()
    off = Switches(jnp.zeros_like(base.weight), jnp.zeros_like(base.input))
    total, count = np.zeros(len(qf.layers)), 0
    for merged in merge_batches(list(batches)):
        args, kwargs = to_jax_tree(merged.batch.args), to_jax_tree(merged.batch.kwargs)
        mask = None if merged.token_mask is None else jnp.asarray(merged.token_mask.numpy())
        fp = forward(lw.params, lw.buffers, qf.state, off, args, kwargs)
        n = fp.shape[0]
        total += n * np.asarray(study(lw.params, lw.buffers, qf.state, base, args, kwargs, fp, mask))
        count += n
    return dict(zip(qf.names, (total / max(count, 1)).tolist()))
