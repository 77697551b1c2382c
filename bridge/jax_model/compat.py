"""Import `torchax` on torch 2.13: the one compatibility step (docs/design.md §5b).

torch 2.13 removed the named-dimension overloads (`aten.prod.dim_Dimname`,
`aten.all.dimname`, `aten.norm.names_ScalarOpt_dim`, …) that torchax 0.0.13's op tables
name when it is imported and when its environment loads its ops. While those two steps
run, exactly the overloads listed below resolve to an inert placeholder (no model can
call an op torch no longer has); anything else missing still raises. The list is pinned
to the torchax version it was read from; another version is imported without the step
and, if it fails, the error says so.

torchax also claims torch's one out-of-tree device slot (`privateuse1`, renamed "jax")
and registers a device module that reports itself available; torch then takes "jax" for
the process's accelerator and `torch.compile` fails ("not linked with support for jax
devices"). After the import, that module reports itself unavailable (torchax never asks
it). The slot is also the one `torch_npu` uses: in a process that already runs on an
Ascend NPU the JAX model is refused with a clear error, and the reverse is refused by
`bridge.devices`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata

TORCHAX_VERSION = "0.0.13"

REMOVED_OVERLOADS = frozenset(
    {
        "aten::prod.dim_Dimname",
        "aten::all.dimname",
        "aten::all.dimname_out",
        "aten::index_add.dimname",
        "aten::index_copy.dimname",
        "aten::index_copy_.dimname",
        "aten::index_fill.Dimname_Scalar",
        "aten::index_fill.Dimname_Tensor",
        "aten::index_fill_.Dimname_Scalar",
        "aten::index_fill_.Dimname_Tensor",
        "aten::norm.names_ScalarOpt_dim",
        "aten::norm.names_ScalarOpt_dim_dtype",
        "aten::norm.names_dtype_out",
        "aten::norm.names_out",
        "aten::std.names_dim",
        "aten::std.names_out",
        "aten::std.correction_names",
        "aten::std.correction_names_out",
        "aten::std_mean.names_dim",
        "aten::std_mean.correction_names",
        "aten::unbind.Dimname",
    }
)


class JaxModelUnavailableError(ImportError):
    """torchax or flax cannot be imported: the JAX model features are unavailable."""


class RemovedOverload:
    """Stands for an overload torch no longer has; calling it is an error."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<overload {self.name} removed from torch>"

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self.name} was removed from torch; torchax {TORCHAX_VERSION} still names it")


@contextlib.contextmanager
def removed_overloads_as_placeholders(names=REMOVED_OVERLOADS):
    """While inside, `torch.ops.aten.<op>.<overload>` for `names` gives a `RemovedOverload`."""
    import torch._ops as ops

    original = ops.OpOverloadPacket.__getattr__

    def getattr_or_placeholder(packet, key):
        try:
            return original(packet, key)
        except AttributeError:
            name = f"{packet._qualified_op_name}.{key}"
            if name in names:
                return RemovedOverload(name)
            raise

    ops.OpOverloadPacket.__getattr__ = getattr_or_placeholder
    try:
        yield
    finally:
        ops.OpOverloadPacket.__getattr__ = original


_ENV = None


def torchax_env():
    """torchax's default environment, its op tables loaded (once per process)."""
    global _ENV
    if _ENV is not None:
        return _ENV
    try:
        version = importlib.metadata.version("torchax")
    except importlib.metadata.PackageNotFoundError as e:
        raise JaxModelUnavailableError(
            "the JAX model needs torchax: pip install 'jaxq[jax]' (or pip install torchax==0.0.13 flax)"
        ) from e
    import torch

    holder = torch._C._get_privateuse1_backend_name()
    if holder not in ("privateuseone", "jax"):
        raise JaxModelUnavailableError(
            f"torch's out-of-tree device slot is taken by {holder!r} (torch_npu) in this process, "
            "and torchax needs it; use the JAX model in a process that does not run on the NPU"
        )
    step = removed_overloads_as_placeholders() if version == TORCHAX_VERSION else contextlib.nullcontext()
    try:
        with step:
            import torchax

            env = torchax.default_env()
    except AttributeError as e:
        raise JaxModelUnavailableError(
            f"torchax {version} does not import on this torch ({e}); jaxq's compatibility step is written for "
            f"torchax {TORCHAX_VERSION}: pip install torchax=={TORCHAX_VERSION}"
        ) from e
    import torchax.device_module

    torchax.device_module.is_available = lambda: False  # not the process's accelerator (torch.compile, DataLoader)
    from bridge.jax_model import ops

    ops.install(env)
    _ENV = env
    return env
