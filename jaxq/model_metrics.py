"""Model-output distances from float, per sample, for studies over many quantized variants.

    logits  [n, classes]:     KL(softmax(f) ‖ softmax(q)) per row
    hidden  [n, tokens, d]:   1 − cos(f, q) per sample over its real tokens (mask)

A study over several batches averages them over samples, so every sample weighs the same
whatever the size of its batch (`bridge.studies.sensitivity.model_distance`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logits_kl_rows(fp: jax.Array, q: jax.Array) -> jax.Array:
    """`KL(softmax(fp) ‖ softmax(q))` per row, `Σ p·(log p − log q)`."""
    lp = jax.nn.log_softmax(fp.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(q.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def cosine_distance_samples(fp: jax.Array, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`1 − cos` per sample (leading axis), flattening the rest; `mask` `[n, tokens]` drops padded tokens."""
    fp, q = fp.astype(jnp.float32), q.astype(jnp.float32)
    if mask is not None:
        m = mask.reshape(mask.shape + (1,) * (fp.ndim - mask.ndim)).astype(jnp.float32)
        fp, q = fp * m, q * m
    fp, q = fp.reshape(fp.shape[0], -1), q.reshape(q.shape[0], -1)
    tiny = jnp.finfo(jnp.float32).tiny
    return 1.0 - jnp.sum(fp * q, -1) / jnp.sqrt(jnp.maximum(jnp.sum(fp * fp, -1) * jnp.sum(q * q, -1), tiny))


def sample_distances(fp: jax.Array, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-sample distance: KL for 2-D logits, `1 − cos` otherwise."""
    if fp.ndim == 2:
        return logits_kl_rows(fp, q)
    return cosine_distance_samples(fp, q, mask)
