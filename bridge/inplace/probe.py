"""One forward of the first batch that reads what preparation needs to know about the model.

Preparation asks four things of the float model: its output on the probe batch (Conv+BN
fusion's parity reference), the Conv+BN pairs (`fuse.PairRecorder`), the first and last
layers (`ends.EndsRecorder`, which needs autograd on) and the layers whose weight is used
through functional calls (`functional.UseRecorder`). One forward records all four. It runs
on the first batch cut to `PROBE_SAMPLES` samples, or on the whole batch when it is no
larger or the model rejects the cut one (a batch size written into the model).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from bridge.capture.data import Batch, first_samples, run_hooked
from bridge.capture.tensors import tensors_in
from bridge.inplace.ends import Ends, EndsRecorder
from bridge.inplace.functional import UseRecorder
from bridge.inplace.fuse import PairRecorder

PROBE_SAMPLES = 2


class Structure(NamedTuple):
    """What one probe forward found (module docstring)."""

    batch: Batch  # the batch probed: cut to PROBE_SAMPLES samples, or whole
    output: list  # the float model's output tensors on it, detached
    pairs: list[tuple[str, str]]  # (conv, bn) pairs to fold
    ends: Ends | None  # None when not asked for
    functional: set[str]  # layers used through functional calls


def probe_batch(model: nn.Module, batch: Batch) -> Batch:
    """The first batch cut to its first `PROBE_SAMPLES` samples (every tensor whose leading
    size is the batch's); the whole batch when it is no larger or the model rejects the cut one."""
    return probe_structure(model, {}, batch, ends=False).batch


def probe_structure(model: nn.Module, layers: dict[str, nn.Module], batch: Batch, ends: bool) -> Structure:
    """The model's structure from one forward of `batch` cut to `PROBE_SAMPLES` samples
    (module docstring); `ends`: find the first and last of `layers` too (autograd on)."""
    small = first_samples(batch, PROBE_SAMPLES)
    if small is not batch:
        try:
            return _probe(model, layers, small, ends)
        except Exception:  # noqa: BLE001 — the model's own error on the whole batch is raised below
            pass
    return _probe(model, layers, batch, ends)


def _probe(model: nn.Module, layers: dict[str, nn.Module], batch: Batch, want_ends: bool) -> Structure:
    pairs, uses = PairRecorder(model), UseRecorder(model, layers)
    ends = EndsRecorder(layers) if want_ends else None
    handles = pairs.handles + uses.handles + (ends.handles if ends is not None else [])
    with uses.mode:
        out = run_hooked(model, batch, handles, grad=want_ends)
    return Structure(
        batch,
        [t.detach() for t in tensors_in(out)],
        pairs.pairs(model),
        ends.ends(out) if ends is not None else None,
        uses.functional(),
    )
