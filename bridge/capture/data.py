"""Calibration data: normalising user batches and making data-free virtual inputs.

A batch is a tensor, a tuple/list of positional inputs, or a dict of keyword inputs;
`calib_data` is a list or any re-iterable of batches (a DataLoader). One-shot iterators
(generators) are materialised once so that calibration can read them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Iterable, Iterator, NamedTuple

import torch

from bridge.capture.tensors import tensors_in


class CalibrationDataError(ValueError):
    """A calibration batch has the wrong type or makes the model fail."""


class HookError(Exception):
    """Raised by a jaxq hook inside the model's forward: passed on unwrapped."""


class Batch(NamedTuple):
    args: tuple
    kwargs: dict


def as_batch(batch: Any, index: int) -> Batch:
    """Normalise one user batch to positional and keyword inputs."""
    if isinstance(batch, torch.Tensor):
        return Batch((batch,), {})
    if isinstance(batch, (tuple, list)):
        return Batch(tuple(batch), {})
    if isinstance(batch, dict):
        if not all(isinstance(k, str) for k in batch):
            raise CalibrationDataError(f"calib_data batch {index}: dict keys must be argument names (str)")
        return Batch((), dict(batch))
    raise CalibrationDataError(
        f"calib_data batch {index} has type {type(batch).__name__}; expected a torch.Tensor, "
        "a tuple/list of positional inputs, or a dict of keyword inputs"
    )


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def reiterable(calib_data: Iterable | None) -> Iterable | None:
    """`calib_data` as something that can be iterated more than once."""
    if calib_data is None:
        return None
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise CalibrationDataError(
            f"calib_data must be a list (or iterable) of batches, got a single {type(calib_data).__name__}; "
            "wrap it in a list: calib_data=[batch]"
        )
    try:
        it = iter(calib_data)
    except TypeError:
        raise CalibrationDataError(
            f"calib_data of type {type(calib_data).__name__} is not iterable; give a list of batches"
        ) from None
    if it is calib_data or (
        not isinstance(calib_data, (Sequence, torch.utils.data.DataLoader)) and iter(calib_data) is it
    ):
        return list(it)  # one-shot: a second pass would miss what the first consumed
    return calib_data


def iter_batches(calib_data: Iterable, device: torch.device) -> Iterator[tuple[int, Batch]]:
    for i, raw in enumerate(calib_data):
        b = as_batch(raw, i)
        yield i, Batch(to_device(b.args, device), to_device(b.kwargs, device))


def virtual_batch(input_shape: tuple[tuple[int, ...], ...], seed: int) -> list:
    """msModelSlim's data-free input: one `torch.rand(shape)` sample per model input."""
    g = torch.Generator().manual_seed(seed)
    inputs = tuple(torch.rand(shape, generator=g) for shape in input_shape)
    return [inputs[0] if len(inputs) == 1 else inputs]


def check_input_shape(model: torch.nn.Module, input_shape, device) -> None:
    """Run the model once on zeros of `input_shape`; a rejection names the field."""
    inputs = tuple(torch.zeros(shape, device=device) for shape in input_shape)
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # the model rejected the virtual input
        shapes = [list(s) for s in input_shape]
        raise CalibrationDataError(
            f"QuantConfig.input_shape={shapes[0] if len(shapes) == 1 else shapes} was rejected by the model "
            f"({type(e).__name__}: {e}); give the shape of one real input batch (one shape per model input)"
        ) from e


def first_samples(batch: Batch, samples: int) -> Batch:
    """`batch` with every tensor whose leading size is the batch's cut to its first
    `samples` (the batch itself when it is no larger)."""
    leading = [t.shape[0] for t in tensors_in((batch.args, batch.kwargs)) if t.dim() > 0]
    if not leading or leading[0] <= samples:
        return batch
    size = leading[0]

    def cut(obj):
        if isinstance(obj, torch.Tensor):
            return obj[:samples] if obj.dim() > 0 and obj.shape[0] == size else obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(cut(o) for o in obj)
        if isinstance(obj, dict):
            return {k: cut(v) for k, v in obj.items()}
        return obj

    return batch._replace(args=cut(batch.args), kwargs=cut(batch.kwargs))


def run_hooked(model: torch.nn.Module, batch: Batch, handles: list, grad: bool = False):
    """`run_model` on `batch` (as batch 0) with autograd on or off, then remove the hook
    `handles` (also on error)."""
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            return run_model(model, batch, 0)
    finally:
        for h in handles:
            h.remove()


def run_model(model: torch.nn.Module, batch: Batch, index: int):
    """Forward one batch; a failure names the batch."""
    try:
        return model(*batch.args, **batch.kwargs)
    except (CalibrationDataError, FloatingPointError, HookError):
        raise
    except Exception as e:  # the user's model raised: say which batch
        shapes = [tuple(a.shape) for a in batch.args if isinstance(a, torch.Tensor)]
        shapes += [f"{k}={tuple(v.shape)}" for k, v in batch.kwargs.items() if isinstance(v, torch.Tensor)]
        raise CalibrationDataError(
            f"the model raised on calib_data batch {index} (input shapes {shapes}): {type(e).__name__}: {e}"
        ) from e
