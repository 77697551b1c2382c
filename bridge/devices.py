"""Resolve `QuantConfig.device` to a torch device, with a clear error when unavailable."""

from __future__ import annotations

import importlib

import torch


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used on this machine."""


def resolve_device(name: str) -> torch.device:
    """`"cpu"`, `"cuda[:N]"` or `"npu[:N]"` → `torch.device`, checking availability.

    `npu` needs Huawei's `torch_npu` package (which registers the device with torch) and
    Ascend hardware; `cuda` needs a CUDA build of torch and a GPU.
    """
    kind = name.split(":")[0]
    if kind == "npu":
        if torch._C._get_privateuse1_backend_name() == "jax":
            raise DeviceUnavailableError(
                f"QuantConfig.device={name!r}: this process loaded the JAX model (torchax), which holds the device "
                "slot torch_npu needs; calibrate on the NPU in a fresh process"
            )
        try:
            importlib.import_module("torch_npu")
        except ImportError as e:
            raise DeviceUnavailableError(
                f"QuantConfig.device={name!r} needs the 'torch_npu' package and Ascend hardware; "
                f"torch_npu could not be imported ({e}). Install torch_npu matching torch "
                f"{torch.__version__}, or use device='cpu'."
            ) from e
        if not (hasattr(torch, "npu") and torch.npu.is_available()):
            raise DeviceUnavailableError(f"QuantConfig.device={name!r}: torch_npu is installed but no NPU is available")
    elif kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"QuantConfig.device={name!r}: torch {torch.__version__} sees no CUDA device; use device='cpu'"
        )
    return torch.device(name)
