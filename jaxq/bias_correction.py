"""Bias correction: remove the mean output shift that weight quantization causes.

Rounding (and clipping) a weight `W` to `Ŵ = (q − o)·s` changes every output by
`(Ŵ − W)·x`. Its expectation is a per-channel constant that no later layer averages
away; on BN-folded CNNs it dominates the model error at 8 bits. Empirical bias
correction (Nagel et al. 2019, "Data-Free Quantization", §4.2) adds it back:

    δ_c = Σ_d (W − Ŵ)_{c,d} · E[row]_d          so that   E[Ŵ·row + b + δ] = E[W·row + b]

with `E[row]` the mean input row (`jaxq.rows`) of the float model over the calibration
data. Only the weight error is corrected: folding the activation quantizer's clipping into
`δ` too was measured worse on both real models (outlier tokens set the mean;
`benchmarks/README.md`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bias_shift(mean_row: jax.Array, wg: jax.Array, wg_hat: jax.Array) -> jax.Array:
    """`δ = (W − Ŵ)·E[row]` per output channel.

    Args:
      mean_row: `[g, d]` mean input row per group.
      wg: float weight `[g, out/g, d]` (`jaxq.rows.grouped_weight`).
      wg_hat: the simulated weight `Ŵ`, same shape.

    Returns: `[out]` in float32, channels in the weight's order (group-major).
    """
    d = wg.astype(jnp.float32) - wg_hat.astype(jnp.float32)
    return jnp.einsum("god,gd->go", d, mean_row.astype(jnp.float32), precision="highest").reshape(-1)


@jax.jit
def bias_shift_bucket(mean_rows: jax.Array, wgs: jax.Array, wg_hats: jax.Array) -> jax.Array:
    """`bias_shift` over a stacked bucket of equal-shaped layers."""
    return jax.vmap(bias_shift)(mean_rows, wgs, wg_hats)
