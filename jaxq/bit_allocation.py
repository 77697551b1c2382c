"""Bit allocation under a size budget (multiple-choice knapsack), pure NumPy/JAX-free.

Each layer `k` picks a width `b` from `bits`; its weight costs `n_k · b` bits and adds
`δ_k(b)` to the model's distance from float (additive model, as in HAWQ-v3's ILP). For
every budget, dynamic programming over `grid` units of `budget / grid` minimises
`Σ δ_k(b_k)` subject to `Σ n_k b_k ≤ budget` with every size rounded *up* to whole units:
a result never exceeds its budget, and no allocation within `budget − layers·unit` is
cheaper (with 48 layers and the default grid, within 0.24 % of the budget).
"""

from __future__ import annotations

import numpy as np


def _solve(weights: np.ndarray, costs: np.ndarray, cap: int) -> np.ndarray | None:
    n_layers, n_bits = costs.shape
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((n_layers, cap + 1), np.int64)
    for k in range(n_layers):
        new = np.full(cap + 1, np.inf)
        for j in range(n_bits):
            w = weights[k, j]
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + costs[k, j]
            better = cand < new
            new[better] = cand[better]
            choice[k, better] = j
        best = new
    if not np.isfinite(best).any():
        return None
    c = int(np.argmin(best))
    out = np.zeros(n_layers, np.int64)
    for k in range(n_layers - 1, -1, -1):
        out[k] = choice[k, c]
        c -= weights[k, out[k]]
    return out


def allocate(
    sizes: np.ndarray, costs: np.ndarray, bits: tuple[int, ...], budgets: np.ndarray, grid: int = 20000
) -> np.ndarray:
    """`[len(budgets), layers]` indices into `bits`: for each budget (bits of weight), an
    allocation within it whose cost is no more than that of the best allocation within
    `budget − layers·budget/grid`; `-1` rows where none fits.

    `sizes`: `[layers]` weight elements; `costs`: `[layers, len(bits)]` distance added by
    each choice."""
    sizes = np.asarray(sizes, np.float64)
    costs = np.asarray(costs, np.float64)
    item = sizes[:, None] * np.asarray(bits, np.float64)[None, :]
    out = np.full((len(budgets), len(sizes)), -1, np.int64)
    for i, budget in enumerate(np.asarray(budgets, np.float64)):
        if budget <= 0 or budget < item.min(1).sum():
            continue
        unit = budget / grid
        found = _solve(np.ceil(item / unit - 1e-9).astype(np.int64), costs, grid)
        if found is not None and item[np.arange(len(sizes)), found].sum() <= budget * (1 + 1e-12):
            out[i] = found
    return out


def pareto(sizes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both size and value (sorted by size)."""
    order = np.lexsort((values, sizes))
    keep, best = [], np.inf
    for i in order:
        if values[i] < best:
            keep.append(i)
            best = values[i]
    return np.asarray(keep, np.int64)
