"""Mixed-precision weight bit widths from the JAX model: per-layer costs, the allocation
for a size budget, and the measured size ↔ distance front.

1. `δ_k(b)`: model-output distance from float with only layer `k`'s weight quantized,
   round to nearest at `b` bits on the channel ranges calibration would give that width
   (`w_range`, `jaxq.weight_range.resolved_range`; `vmap` over every (layer, width) pair,
   one program).
2. For a grid of budgets (average bits per weight of the quantized layers), the
   allocation minimising `Σ δ_k(b_k)` (`jaxq.bit_allocation.allocate`).
3. Every allocation, and each uniform width, measured on the whole quantized model
   (weights at their widths, activations as calibrated) in one `vmap`ped program; the
   front is the non-dominated measured points.

Use an allocation with `QuantConfig(layer_bits=front.layer_bits(avg_bits))`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bridge.jax_model.collate import as_batches, merge_batches
from bridge.jax_model.lower import to_jax_tree
from bridge.jax_model.quantized import QuantizedForward, refuse_weight_groups
from bridge.jax_model.studies import primary
from jaxq.bit_allocation import allocate, pareto
from jaxq.model_metrics import sample_distances
from jaxq.model_quant import Switches, weight_qparams_for_bits
from jaxq.weight_range import resolved_range


@dataclasses.dataclass
class MixedPrecisionFront:
    """Measured allocations: `avg_bits[i]` (weight bits per element over the quantized
    layers), `distance[i]` (mean KL or `1 − cos` from float), `allocations[i]` (layer →
    bits); `front` indexes the non-dominated ones, smallest first; `costs` is `δ_k(b)`."""

    bits: tuple[int, ...]
    layers: list[str]
    sizes: np.ndarray
    costs: np.ndarray
    avg_bits: np.ndarray
    distance: np.ndarray
    allocations: list[dict[str, int]]
    labels: list[str]
    front: np.ndarray

    def allocation(self, avg_bits: float) -> dict[str, int]:
        """The measured allocation with the lowest distance whose size is within `avg_bits`."""
        ok = [i for i in range(len(self.avg_bits)) if self.avg_bits[i] <= avg_bits + 1e-9]
        if not ok:
            raise ValueError(
                f"no measured allocation fits {avg_bits} bits per weight (smallest: {self.avg_bits.min():.3f})"
            )
        return self.allocations[min(ok, key=lambda i: self.distance[i])]

    def layer_bits(self, avg_bits: float) -> dict[str, int]:
        """`QuantConfig.layer_bits` for `allocation(avg_bits)`."""
        return dict(self.allocation(avg_bits))

    def __str__(self) -> str:
        lines = [f"{'bits/weight':>11}  {'distance':>10}  allocation"]
        for i in self.front:
            counts = {b: sum(1 for v in self.allocations[i].values() if v == b) for b in self.bits}
            lines.append(
                f"{self.avg_bits[i]:>11.3f}  {self.distance[i]:>10.5g}  {self.labels[i]}: "
                + ", ".join(f"{n}×W{b}" for b, n in counts.items() if n)
            )
        return "\n".join(lines)


def _tables(qf: QuantizedForward, bits: tuple[int, ...], w_range: str | None = None):
    """Per layer, the weight quantizer state at every width stacked on a leading axis."""
    tables = {}
    for layer in qf.layers:
        w = qf.float_weights[layer.weight_key]
        scheme = qf.weight_scheme[layer.name]
        per_bits = [weight_qparams_for_bits(w, scheme, b, resolved_range(w_range, b)) for b in bits]
        tables[layer.name] = tuple(jnp.stack([p[i] for p in per_bits]) for i in range(4))
    return tables


def _state_at(qf: QuantizedForward, tables, bit_index):
    """The quantizer state with layer k's weight at `bits[bit_index[k]]` (traced)."""
    out = {}
    for layer in qf.layers:
        scale, offset, qmin, qmax = (t[bit_index[layer.index]] for t in tables[layer.name])
        out[layer.name] = qf.state[layer.name]._replace(w_scale=scale, w_offset=offset, w_qmin=qmin, w_qmax=qmax)
    return out


def _programs(qf: QuantizedForward, chunk: int):
    key = ("mixed_precision", chunk)
    if key in qf.programs:
        return qf.programs[key]
    lw, fn = qf.lowered, qf.fn
    params = dict(lw.params)
    params.update(qf.float_weights)  # widths other than the calibrated one start from the float weights

    def distance(tables, bit_index, switches, args, kwargs, fp, mask):
        out = primary(fn(params, lw.buffers, _state_at(qf, tables, bit_index), switches, args, kwargs))
        return jnp.mean(sample_distances(fp, out, mask))

    def costs(tables, args, kwargs, fp, mask, layer_onehots, bit_indices):
        def one(v):
            onehot, bit_index = v
            sw = Switches(onehot, jnp.zeros_like(onehot))
            return distance(tables, bit_index, sw, args, kwargs, fp, mask)

        return jax.lax.map(one, (layer_onehots, bit_indices), batch_size=chunk)

    def measure(tables, args, kwargs, fp, mask, allocations, switches):
        return jax.lax.map(
            lambda a: distance(tables, a, switches, args, kwargs, fp, mask), allocations, batch_size=chunk
        )

    def float_out(args, kwargs):
        n = len(qf.layers)
        off = Switches(jnp.zeros(n), jnp.zeros(n))
        return primary(fn(params, lw.buffers, qf.state, off, args, kwargs))

    qf.programs[key] = (jax.jit(float_out), jax.jit(costs), jax.jit(measure))
    return qf.programs[key]


def mixed_precision_front(
    qf: QuantizedForward, batches, bits=(4, 6, 8), budgets=None, chunk: int = 4, w_range: str | None = None
) -> MixedPrecisionFront:
    """Costs, allocations for `budgets` (average bits per weight; default 16 steps from
    `min(bits)` to `max(bits)` and each width in `bits`) and their measured front over `batches`.
    `w_range`: the weight ranges at each width, as `QuantConfig.w_range` (pass the config's,
    so the front measures what `layer_bits` will calibrate)."""
    refuse_weight_groups(qf, "the mixed-precision front")
    batches = as_batches(batches)
    bits = tuple(sorted(int(b) for b in bits))
    if len(bits) < 2 or any(b not in (2, 3, 4, 5, 6, 7, 8) for b in bits):
        raise ValueError(f"bits={bits}: give at least two widths from 2 to 8")
    names = qf.names
    n_layers = len(names)
    sizes = np.array([int(np.prod(qf.float_weights[layer.weight_key].shape)) for layer in qf.layers], np.float64)
    if budgets is None:  # 16 steps, and every uniform width's size exactly
        budgets = np.unique(np.round(np.concatenate([np.linspace(bits[0], bits[-1], 16), bits]), 6))
    budgets = np.asarray(budgets, np.float64)
    tables = _tables(qf, bits, w_range)
    float_out, costs_fn, measure_fn = _programs(qf, chunk)
    merged = [
        (
            to_jax_tree(m.batch.args),
            to_jax_tree(m.batch.kwargs),
            None if m.token_mask is None else jnp.asarray(m.token_mask.numpy()),
        )
        for m in merge_batches(batches)
    ]
    fps = [float_out(a, k) for a, k, _ in merged]
    weights = [float(fp.shape[0]) for fp in fps]

    def mean_over_batches(run):
        return sum(w * np.asarray(run(a, k, fp, m)) for (a, k, m), fp, w in zip(merged, fps, weights)) / sum(weights)

    onehots = np.repeat(np.eye(n_layers, dtype=np.float32), len(bits), axis=0)
    bit_idx = np.tile(np.repeat(np.arange(len(bits))[None, :], n_layers, axis=0).reshape(-1, 1), (1, n_layers)).astype(
        np.int32
    )
    costs = mean_over_batches(
        lambda a, k, fp, m: costs_fn(tables, a, k, fp, m, jnp.asarray(onehots), jnp.asarray(bit_idx))
    )
    costs = costs.reshape(n_layers, len(bits))
    chosen = allocate(sizes, costs, bits, budgets * sizes.sum())
    rows, labels = [], []
    for j, b in enumerate(bits):
        rows.append(np.full(n_layers, j))
        labels.append(f"uniform W{b}")
    for budget, row in zip(budgets, chosen):
        if row[0] >= 0:
            rows.append(row)
            labels.append(f"budget {budget:.2f}")
    rows = np.stack(rows).astype(np.int32)
    switches = qf.default_switches()
    dist = mean_over_batches(lambda a, k, fp, m: measure_fn(tables, a, k, fp, m, jnp.asarray(rows), switches))
    bit_values = np.asarray(bits)[rows]
    avg = (bit_values * sizes[None, :]).sum(1) / sizes.sum()
    allocations = [dict(zip(names, map(int, r))) for r in bit_values]
    return MixedPrecisionFront(
        bits, names, sizes, costs, avg, np.asarray(dist, np.float64), allocations, labels, pareto(avg, np.asarray(dist))
    )
