import pytest
import torch

from bridge import DeviceUnavailableError, resolve_device


def test_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_npu_without_torch_npu(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "torch_npu":
            raise ImportError("No module named 'torch_npu'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    # as in a process that has not loaded the JAX model (torchax holds the NPU's device slot)
    monkeypatch.setattr(torch._C, "_get_privateuse1_backend_name", lambda: "privateuseone")
    with pytest.raises(DeviceUnavailableError, match=r"needs the 'torch_npu' package.*device='cpu'"):
        resolve_device("npu:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_missing():
    with pytest.raises(DeviceUnavailableError, match="no CUDA device"):
        resolve_device("cuda")
