"""Few shapes for the JAX model: calibration batches merged into as few as possible.

Every distinct input shape is a compilation, so batches are merged before a study:
tensors equal in all but the batch axis are concatenated; keyword batches of token ids
with an `attention_mask` (transformers' convention) are grouped by length (next power of
two) and right-padded to it (pad id 0, mask 0), and the mask travels with the result so
metrics skip padded tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from bridge.capture.data import Batch, as_batch
from jaxq.padding import power_of_two


@dataclasses.dataclass
class Merged:
    """A merged batch and, for padded token batches, the `[batch, tokens]` mask of real tokens."""

    batch: Batch
    token_mask: torch.Tensor | None = None


def _shape_key(b: Batch):
    return (
        tuple(None if not isinstance(t, torch.Tensor) else tuple(t.shape[1:]) for t in b.args),
        tuple(sorted((k, tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else repr(v)) for k, v in b.kwargs.items())),
    )


def is_token_batch(b: Batch) -> bool:
    mask = b.kwargs.get("attention_mask")
    return (
        not b.args
        and isinstance(mask, torch.Tensor)
        and mask.dim() == 2
        and all(isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == mask.shape for v in b.kwargs.values())
    )


def _bucket_length(n: int) -> int:
    """Token batches are padded to a power of two (at least 16): few shapes, little padding."""
    return power_of_two(n, least=16)


def pad_tokens(batches: list[Batch]) -> Merged:
    length = _bucket_length(max(b.kwargs["attention_mask"].shape[1] for b in batches))
    out = {}
    for key in batches[0].kwargs:
        out[key] = torch.cat(
            [torch.nn.functional.pad(b.kwargs[key], (0, length - b.kwargs[key].shape[1])) for b in batches]
        )
    return Merged(Batch((), out), out["attention_mask"].bool())


def as_batches(batches, what: str = "batches") -> list[Batch]:
    """Batches in any `calib_data` form (a tensor, a tuple/list of positional inputs, a dict
    of keyword inputs, or a `Batch`) as `Batch`es; `ValueError` naming `what` when empty."""
    if isinstance(batches, (torch.Tensor, dict)) or batches is None:
        raise TypeError(f"{what} must be a list of batches (like calib_data), got {type(batches).__name__}")
    out = [b if isinstance(b, Batch) else as_batch(b, i) for i, b in enumerate(batches)]
    if not out:
        raise ValueError(f"{what} is empty: give at least one batch (a tensor, a tuple/list of inputs or a dict)")
    return out


def merge_batches(batches: list[Batch]) -> list[Merged]:
    """`batches` merged into as few batches as their shapes allow (order kept within a group)."""
    if not batches:
        return []
    if all(is_token_batch(b) for b in batches) and len({tuple(b.kwargs) for b in batches}) == 1:
        by_length: dict[int, list[Batch]] = {}
        for b in batches:
            by_length.setdefault(_bucket_length(b.kwargs["attention_mask"].shape[1]), []).append(b)
        return [pad_tokens(group) for _, group in sorted(by_length.items())]
    groups: dict = {}
    for b in batches:
        groups.setdefault(_shape_key(b), []).append(b)
    merged = []
    for group in groups.values():
        args = tuple(
            torch.cat([b.args[i] for b in group]) if isinstance(group[0].args[i], torch.Tensor) else group[0].args[i]
            for i in range(len(group[0].args))
        )
        kwargs = {
            k: torch.cat([b.kwargs[k] for b in group]) if isinstance(v, torch.Tensor) else v
            for k, v in group[0].kwargs.items()
        }
        merged.append(Merged(Batch(args, kwargs)))
    return merged
