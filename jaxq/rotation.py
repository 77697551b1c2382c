"""Orthogonal rotations that spread outlier channels before quantization (QuaRot,
Ashkboos et al. 2024).

A decoder's residual stream `x [t, h]` can be replaced by `x·Q` for any orthogonal `Q`
without changing the model's function: RMSNorm (with its weight folded into the next
Linear layers) only sees `‖x‖`, which `Q` keeps; every Linear that reads the stream takes
`W·Q`, every Linear that writes it `Qᵀ·W`. With `Q` a randomized Hadamard matrix,

    Q = H_n · diag(±1) / √n,   H_{2n} = [[H_n, H_n], [H_n, −H_n]],  H_1 = [1],

each rotated channel mixes all `n` channels equally, so a few large channels no longer
set the quantization range of a whole row or token. A width that is not a power of two
is rotated block-diagonally, each block of the largest power of two that divides it.
"""

from __future__ import annotations

import numpy as np


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix `[n, n]` (entries ±1), `n` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n={n} must be a power of two")
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def power_of_two_block(width: int) -> int:
    """The largest power of two that divides `width`."""
    return width & -width


def random_hadamard_parts(width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(block [b, b], signs [width])` of `random_hadamard(width, seed)`: the matrix is
    `kron(I, block)·diag(signs)`, so `x·Q` is each `b` values times `block`, then the signs."""
    b = power_of_two_block(width)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=width)
    return hadamard(b) / np.sqrt(b), signs


def random_hadamard(width: int, seed: int) -> np.ndarray:
    """An orthogonal `[width, width]` float64 matrix: block-diagonal `H_b/√b`, then
    `diag(±1)`, with `b = power_of_two_block(width)`, signs drawn from `seed`."""
    block, signs = random_hadamard_parts(width, seed)
    q = np.kron(np.eye(width // len(block)), block)
    return q * signs[None, :]
