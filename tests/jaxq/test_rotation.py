"""Randomized Hadamard matrices (`jaxq.rotation`)."""

import numpy as np
import pytest

from jaxq.rotation import hadamard, power_of_two_block, random_hadamard


@pytest.mark.parametrize("width", [1, 8, 64, 256, 96, 768])
def test_random_hadamard_is_orthogonal_and_spreads_every_channel(width):
    q = random_hadamard(width, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(width), atol=1e-12)
    b = power_of_two_block(width)
    assert np.allclose(np.abs(q[q != 0]), 1 / np.sqrt(b))  # each channel mixed equally into its block
    assert (np.count_nonzero(q, axis=1) == b).all()


def test_hadamard_rejects_other_sizes_and_seeds_differ():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)
    assert power_of_two_block(768) == 256
    assert not np.array_equal(random_hadamard(64, 0), random_hadamard(64, 1))
    np.testing.assert_array_equal(random_hadamard(64, 5), random_hadamard(64, 5))
