"""Sweeps of a calibration axis in one compiled call, from a histogram observer state.

Every candidate range is scored by the same exact `grid_error` the histogram search
minimises (in real units: bin units × w², `w` the bin width), so min-max, sigma and
L2-optimal ranges are directly comparable:

    sweep_sigma(state, sigmas, levels)   → ranges of msModelSlim's sigma rule for every σ
    sweep_bins(state, factors, levels)   → L2-optimal ranges when the histogram is
                                           coarsened by each factor (2048/f bins)

`sigmas` and `factors` are traced arrays: sweeping other values of the same count
compiles nothing new. Moments for the sigma rule come from bin centres.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq.histogram import HistogramState, bins_to_range, grid_error, l2_optimal_bins, zero_limits
from jaxq.observers import sigma_range


class SweepResult(NamedTuple):
    """Candidate ranges `[lo, hi]` and their L2 quantization error on the histogram."""

    lo: jax.Array
    hi: jax.Array
    error: jax.Array


def range_error(state: HistogramState, lo, hi, levels: int) -> jax.Array:
    """L2 error (real units) of quantizing the histogram onto `levels` points over `[lo, hi]`."""
    bins = state.hist.shape[0]
    w = (state.hi - state.lo) / bins
    safe_w = jnp.maximum(w, jnp.finfo(jnp.float32).tiny)
    start = (lo - state.lo) / safe_w
    end = (hi - state.lo) / safe_w - 1.0
    return grid_error(state.hist, start, end, levels) * w * w


def _moments(state: HistogramState):
    bins = state.hist.shape[0]
    w = (state.hi - state.lo) / bins
    centres = state.lo + w * (jnp.arange(bins, dtype=jnp.float32) + 0.5)

    def std(weights):
        n = jnp.maximum(jnp.sum(weights), 1.0)
        mean = jnp.sum(weights * centres) / n
        return jnp.sqrt(jnp.sum(weights * (centres - mean) ** 2) / n)

    return std(state.hist), std(jnp.where(centres > 0, state.hist, 0.0))


@functools.partial(jax.jit, static_argnames=("levels",))
def sweep_sigma(state: HistogramState, sigmas: jax.Array, levels: int = 256) -> SweepResult:
    """msModelSlim's sigma ranges for every `σ` in `sigmas` (σ = 0: min-max) and their errors."""
    std_all, std_pos = _moments(state)

    def one(sigma):
        lo, hi = _sigma_range_traced(state.lo, state.hi, std_all, std_pos, sigma)
        return SweepResult(lo, hi, range_error(state, lo, hi, levels))

    return jax.vmap(one)(jnp.asarray(sigmas, jnp.float32))


def _sigma_range_traced(lo, hi, std_all, std_pos, sigma):
    """`sigma_range` with a traced σ (σ = 0 selects plain min-max)."""
    slo, shi = sigma_range(lo, hi, std_all, std_pos, sigma)
    zero = sigma == 0
    return jnp.where(zero, lo, slo), jnp.where(zero, hi, shi)


def coarsen(hist: jax.Array, factor) -> jax.Array:
    """Sum groups of `factor` adjacent bins; the result keeps length B, zero-padded."""
    bins = hist.shape[0]
    cdf = jnp.concatenate([jnp.zeros((1,), hist.dtype), jnp.cumsum(hist)])
    edges = jnp.minimum(jnp.arange(bins + 1) * factor, bins)
    return jnp.diff(cdf[edges])


@functools.partial(jax.jit, static_argnames=("levels",))
def sweep_bins(state: HistogramState, factors: jax.Array, levels: int = 256) -> SweepResult:
    """L2-optimal range on the histogram coarsened by each factor, scored on the full one."""
    bins = state.hist.shape[0]

    def one(factor):
        coarse_hi = state.lo + (state.hi - state.lo) * factor  # the coarse bins span this range
        s, e, _ = l2_optimal_bins(coarsen(state.hist, factor), levels, zero_limits(state.lo, coarse_hi, bins))
        lo, hi = bins_to_range(state.lo, coarse_hi, s, e, bins)
        hi = jnp.minimum(hi, state.hi)
        return SweepResult(lo, hi, range_error(state, lo, hi, levels))

    return jax.lax.map(one, jnp.asarray(factors, jnp.int32))


@functools.partial(jax.jit, static_argnames=("levels",))
def compare_methods(state: HistogramState, sigma, levels: int = 256) -> dict[str, SweepResult]:
    """Min-max, sigma (`sigma`) and L2-optimal ranges of one histogram, with their errors."""
    bins = state.hist.shape[0]
    s, e, _ = l2_optimal_bins(state.hist, levels, zero_limits(state.lo, state.hi, bins))
    l2_lo, l2_hi = bins_to_range(state.lo, state.hi, s, e, bins)
    std_all, std_pos = _moments(state)
    sg_lo, sg_hi = _sigma_range_traced(state.lo, state.hi, std_all, std_pos, jnp.float32(sigma))
    out = {}
    for name, (lo, hi) in {"minmax": (state.lo, state.hi), "sigma": (sg_lo, sg_hi), "l2": (l2_lo, l2_hi)}.items():
        out[name] = SweepResult(lo, hi, range_error(state, lo, hi, levels))
    return out
