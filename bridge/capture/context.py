"""What one calibration reads: the model, its quantizers and specs, config and data."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

import jaxq
from bridge.capture.data import CalibrationDataError, iter_batches, run_model


class UncalibratedLayerError(CalibrationDataError):
    """A quantized layer never saw an input in the calibration data."""


@dataclasses.dataclass
class Context:
    """What a calibration reads: the model, its quantizers and specs, config and data."""

    model: nn.Module
    quantizers: dict  # name → LayerQuantizer
    specs: dict  # name → jaxq.LayerSpec
    cfg: jaxq.QuantConfig
    calib_data: Iterable
    device: torch.device
    progress: bool = True
    mesh: object = None  # a jax.sharding.Mesh: data-parallel calibration (bridge.jax_model.observe)
    default_bias_correction: bool = (
        False  # bias correction is on by default, not asked for: skip it where it cannot run
    )
    synthetic: list = dataclasses.field(default_factory=list)  # `recon_synthetic` image batches

    def num_batches(self) -> int | None:
        try:
            return len(self.calib_data)
        except TypeError:
            return None

    def bar(self, desc: str, total: int | None, unit: str = "layer", disable: bool = False):
        return tqdm(total=total, desc=desc, unit=unit, disable=disable or not self.progress)

    def forward_all(self, hooks, desc: str, after_batch=None) -> int:
        """Run the model over every batch with `hooks` (a context manager) active; returns the batch count."""
        batches = tqdm(
            iter_batches(self.calib_data, self.device),
            total=self.num_batches(),
            desc=desc,
            unit="batch",
            disable=not self.progress,
        )
        count = 0
        # cached: each layer's (fake-quant) weight is computed once for the pass, not per batch
        with hooks, torch.no_grad(), parametrize.cached():
            for i, batch in batches:
                run_model(self.model, batch, i)
                count += 1
                if after_batch is not None:
                    after_batch()
        if count == 0:
            raise CalibrationDataError("calib_data yielded no batch; give at least one batch")
        return count
