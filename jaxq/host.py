"""Host (NumPy) buffers that JAX's CPU client reads in place.

A NumPy array passed to a compiled function is copied into a device buffer unless its
data is aligned to `ALIGNMENT` bytes; NumPy's own large allocations are 16-byte aligned.
Rows and stacked buckets built into `aligned_empty` buffers reach the compiled
calibration steps without that copy (for a layer's sampled rows: as much memory again).
"""

from __future__ import annotations

import numpy as np

ALIGNMENT = 64


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised array whose data starts on an `ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def aligned_copy(a) -> np.ndarray:
    """A copy of `a` in an `aligned_empty` buffer."""
    a = np.asarray(a)
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def aligned_concatenate(parts, axis: int = 0) -> np.ndarray:
    """`np.concatenate(parts, axis)` into an `aligned_empty` buffer."""
    parts = [np.asarray(p) for p in parts]
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    return np.concatenate(parts, axis=axis, out=aligned_empty(tuple(shape), np.result_type(*parts)))


def aligned_stack(parts) -> np.ndarray:
    """`np.stack(parts)` into an `aligned_empty` buffer."""
    return aligned_concatenate([np.asarray(p)[None] for p in parts])
