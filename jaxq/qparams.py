"""`QParams` and the rule that turns a real range into a scale and an offset.

Invariant of a `QParams` pytree: `x ≈ (q − offset) · scale` with `q` on the scheme's grid.

Range → (scale, offset), docs/design.md §3:

    symmetric, signed:    o = 0,  s = max(|lo|, |hi|) / (2^(b−1) − 1)
    symmetric, unsigned:  o = 0,  s = max(hi, 0) / (2^b − 1)
    asymmetric:           lo ← min(lo, 0),  hi ← max(hi, 0)
                          s = (hi − lo) / (qmax − qmin)
                          o = clamp(qmin − round(lo / s), qmin, qmax)

`s` is floored at float32 eps, so an all-zero channel still gives a finite quantizer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxq.scheme import QScheme

EPS = float(jnp.finfo(jnp.float32).eps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and integer offset of a quantizer: `x ≈ (q − offset) · scale`.

    `scale` is float32 and `offset` int32, both scalars (per-tensor) or vectors over the
    scheme's axis (per-channel). `scheme` is static pytree metadata.
    """

    scale: jax.Array
    offset: jax.Array
    scheme: QScheme = dataclasses.field(metadata=dict(static=True))


def qparams_from_range(lo: jax.Array, hi: jax.Array, scheme: QScheme) -> QParams:
    """Scale and offset that map `[lo, hi]` onto the grid of `scheme` (see module doc)."""
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        if scheme.signed:
            amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
            scale = amax / jnp.float32(qmax)
        else:
            scale = jnp.maximum(hi, 0.0) / jnp.float32(qmax)
        scale = jnp.maximum(scale, EPS)
        offset = jnp.zeros_like(scale, dtype=jnp.int32)
    else:
        lo = jnp.minimum(lo, 0.0)
        hi = jnp.maximum(hi, 0.0)
        scale = jnp.maximum((hi - lo) / jnp.float32(qmax - qmin), EPS)
        offset = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax).astype(jnp.int32)
    return QParams(scale=scale, offset=offset, scheme=scheme)
