import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxq.bit_allocation import allocate, pareto

BITS = (4, 6, 8)


def _brute(sizes, costs, budget):
    best = None
    for c in itertools.product(range(len(BITS)), repeat=len(sizes)):
        if sum(sizes[k] * BITS[j] for k, j in enumerate(c)) <= budget:
            value = sum(costs[k, j] for k, j in enumerate(c))
            best = value if best is None or value < best else best
    return best


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.floats(3.5, 8.5))
def test_allocation_is_optimal_and_within_budget(seed, avg_bits):
    rng = np.random.default_rng(seed)
    n = 5
    sizes = rng.integers(10, 1000, n).astype(float)
    costs = np.sort(rng.random((n, 3)), axis=1)[:, ::-1] * rng.random((n, 1))
    budget = avg_bits * sizes.sum()
    grid = 200  # coarse, so the rounding guarantee is exercised
    (row,) = allocate(sizes, costs, BITS, np.array([budget]), grid=grid)
    slack = n * budget / grid
    best = _brute(sizes, costs, budget - slack)
    if (row == -1).all():
        assert best is None
        return
    size = sum(sizes[k] * BITS[j] for k, j in enumerate(row))
    assert size <= budget
    if best is not None:
        assert sum(costs[k, j] for k, j in enumerate(row)) <= best + 1e-9


def test_pareto_keeps_only_undominated_points():
    sizes = np.array([4.0, 5.0, 5.0, 6.0, 8.0])
    values = np.array([1.0, 0.5, 0.7, 0.6, 0.1])
    assert list(pareto(sizes, values)) == [0, 1, 4]
