"""Which activation observer a `QuantConfig` asks for (`act_method`, docs/design.md §4)."""

from __future__ import annotations

import math

from jaxq.config import QuantConfig
from jaxq.histogram import histogram_observer
from jaxq.observers import ROW, Observer, batch_percentile_minmax, running_minmax, sigma_statistic


def observer_for(cfg: QuantConfig, num_batches: int | None) -> Observer:
    """0: sigma statistic; 1: min-max (`minmax_combine`); 2: histogram. `num_batches`
    sizes the batch-extremes state of msModelSlim's percentile min-max (None: unknown)."""
    if cfg.act_method == 0:
        return sigma_statistic(float(cfg.sigma))
    if cfg.act_method == 1:
        if cfg.minmax_combine == "running":
            return running_minmax()
        return batch_percentile_minmax(capacity=extremes_capacity(num_batches))
    return histogram_observer_for(cfg)


def histogram_observer_for(cfg: QuantConfig, bins: int | None = None) -> Observer:
    """`cfg`'s histogram observer (`bins` overrides `cfg.hist_bins`)."""
    rows = -(-cfg.hist_samples // ROW)
    return histogram_observer(bins=bins or cfg.hist_bins, levels=2**cfg.a_bit, max_rows=rows)


def extremes_capacity(num_batches: int | None) -> int:
    """Slots for per-batch extremes: the batch count rounded up to a power of two."""
    return max(16, 1 << math.ceil(math.log2(num_batches or 4096)))
