import pytest
import torch

from bridge.jax_model import compat


def test_removed_overloads_resolve_to_placeholders_only_inside_the_step():
    with compat.removed_overloads_as_placeholders():
        placeholder = torch.ops.aten.prod.dim_Dimname
        assert isinstance(placeholder, compat.RemovedOverload)
        with pytest.raises(NotImplementedError, match="removed from torch"):
            placeholder(torch.ones(2))
        with pytest.raises(AttributeError):  # anything not on the pinned list still fails
            torch.ops.aten.prod.no_such_overload
    with pytest.raises(AttributeError):
        torch.ops.aten.prod.dim_Dimname
    assert torch.ops.aten.prod.default(torch.tensor([2.0, 3.0])) == 6.0


def test_torchax_environment_loads_once():
    env = compat.torchax_env()
    assert compat.torchax_env() is env
    with pytest.raises(AttributeError):  # the step left torch as it was
        torch.ops.aten.all.dimname


def test_missing_torchax_is_a_clear_error(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(compat, "_ENV", None)
    monkeypatch.setattr(compat.importlib.metadata, "version", not_installed)
    with pytest.raises(compat.JaxModelUnavailableError, match=r"pip install 'jaxq\[jax\]'"):
        compat.torchax_env()


def test_torch_compile_still_works_after_the_jax_model_loaded():
    compat.torchax_env()
    assert not torch.accelerator.is_available()
    f = torch.compile(lambda x: torch.sin(x) + 1, backend="eager")
    torch.testing.assert_close(f(torch.zeros(3)), torch.ones(3))


def test_npu_and_the_jax_model_refuse_each_other_clearly(monkeypatch):
    from bridge.devices import DeviceUnavailableError, resolve_device

    compat.torchax_env()
    with pytest.raises(DeviceUnavailableError, match="holds the device slot torch_npu needs"):
        resolve_device("npu")
    monkeypatch.setattr(compat, "_ENV", None)
    monkeypatch.setattr(torch._C, "_get_privateuse1_backend_name", lambda: "npu")
    with pytest.raises(compat.JaxModelUnavailableError, match="taken by 'npu'"):
        compat.torchax_env()
