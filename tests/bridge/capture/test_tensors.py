import numpy as np
import torch

from bridge.capture.tensors import to_jax


def to_torch(x, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new torch tensor holding the values of `x` (JAX or NumPy), never aliasing it."""
    out = torch.from_numpy(np.array(x, copy=True))
    return out.to(device=device, dtype=dtype) if dtype is not None else out.to(device)


def test_to_jax_is_zero_copy_on_cpu():
    t = torch.arange(4096, dtype=torch.float32)
    a = to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), t.numpy())


def test_to_jax_handles_non_contiguous_and_grad():
    t = torch.randn(8, 6, requires_grad=True)
    np.testing.assert_array_equal(np.asarray(to_jax(t.T)), t.detach().T.numpy())


def test_to_torch_never_aliases():
    a = to_jax(torch.ones(3))
    t = to_torch(a)
    t.add_(1)
    np.testing.assert_array_equal(np.asarray(a), 1.0)


def test_bfloat16_goes_through_dlpack():
    t = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)
    a = to_jax(t)
    assert str(a.dtype) == "bfloat16"
    np.testing.assert_array_equal(np.asarray(a, np.float32), [1.5, -2.25])
