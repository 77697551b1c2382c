import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxq.host import ALIGNMENT, aligned_concatenate, aligned_copy, aligned_empty, aligned_stack


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=3), st.sampled_from([np.float32, np.int32, np.float64]))
def test_aligned_buffers_start_on_the_boundary_and_hold_what_numpy_would(shape, dtype):
    a = aligned_empty(shape, dtype)
    assert a.shape == tuple(shape) and a.dtype == dtype and a.ctypes.data % ALIGNMENT == 0
    parts = [np.arange(np.prod(shape), dtype=dtype).reshape(shape) + k for k in range(3)]
    cat, stacked, copied = aligned_concatenate(parts), aligned_stack(parts), aligned_copy(parts[1])
    np.testing.assert_array_equal(cat, np.concatenate(parts))
    np.testing.assert_array_equal(copied, parts[1])
    assert copied.ctypes.data % ALIGNMENT == 0 and copied.dtype == dtype
    np.testing.assert_array_equal(stacked, np.stack(parts))
    assert cat.ctypes.data % ALIGNMENT == 0 and stacked.ctypes.data % ALIGNMENT == 0


def test_jax_reads_an_aligned_host_array_in_place_and_copies_a_numpy_one():
    """Why the rows are built into aligned buffers: JAX's CPU client wraps them without a copy."""
    aligned = aligned_empty((256, 64))
    aligned[:] = 1.0
    plain = np.ones((256, 64 + 4), np.float32)[:, 4:]  # not contiguous: always copied
    assert jax.device_put(aligned).unsafe_buffer_pointer() == aligned.ctypes.data
    assert jax.device_put(plain).unsafe_buffer_pointer() != plain.ctypes.data
