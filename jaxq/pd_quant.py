"""Activation step sizes learned on the prediction difference (PD-Quant, Liu et al., CVPR 2023).

Every quantized input's step size becomes `s_a = s_a⁰·exp(u)` (one `u` per layer, LSQ's
gradient through straight-through rounding, `jaxq.model_quant`); the weights, their codes
and bias correction stay as calibrated. The `u` minimise the distance of the whole quantized
model's output from the float model's on the calibration samples:

    L(u) = E_samples[ d(f(x), f_q(x; s⁰·eᵘ)) ],   d = KL(softmax f ‖ softmax f_q) for logits,
                                                      1 − cos otherwise (`jaxq.model_metrics`)

This is PD-Quant's prediction-difference loss applied to the activation step sizes of the
whole network at once (the paper also reconstructs blocks with it and corrects the
calibration data's statistics; neither is done here). It needs the model as a JAX function
(`bridge.jax_model`); a layer's output error no longer decides, the model's does.

`optimise(...)` runs `steps` Adam steps in one `lax.scan`, each on `batch` samples drawn
without replacement from the fitted ones; one compilation per model and input shape.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxq.keep_acc import PdQuant
from jaxq.model_metrics import sample_distances


def take(tree, idx: jax.Array):
    """The samples `idx` (leading axis) of every array of `tree`."""
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def loss(apply: Callable, u, inputs, target: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`L(u)` on these samples: the mean per-sample distance of `apply(u, inputs)` from `target`."""
    return jnp.mean(sample_distances(target, apply(u, inputs), mask))


def optimise(
    apply: Callable,
    u0: dict,
    inputs,
    target: jax.Array,
    fitted: jax.Array,
    key: jax.Array,
    params: PdQuant,
    mask: jax.Array | None = None,
    micro_batch: int = 0,
) -> dict:
    """The learned `u` after `params.steps` Adam steps; each step's mini-batch is `batch`
    samples drawn from the indices `fitted` (`[m]`, int32). `apply(u, inputs)` is the
    quantized model's output on a mini-batch of `inputs` (a pytree, samples on axis 0).
    `micro_batch` (a divisor of the mini-batch; 0: all of it): samples per gradient pass,
    the passes' gradients averaged — the same gradient in less memory."""
    opt = optax.adam(params.lr)
    batch = min(params.batch, int(fitted.shape[0]))
    micro = batch if not micro_batch or micro_batch >= batch else micro_batch
    if batch % micro:
        raise ValueError(f"micro_batch={micro_batch} must divide the mini-batch of {batch} samples")

    def grad_of(u, idx):
        m = None if mask is None else mask[idx]
        return jax.grad(lambda v: loss(apply, v, take(inputs, idx), target[idx], m))(u)

    def step(carry, k):
        u, opt_state = carry
        idx = fitted[jax.random.choice(k, fitted.shape[0], (batch,), replace=False)]
        parts = idx.reshape(batch // micro, micro)
        total = jax.lax.scan(
            lambda acc, part: (jax.tree_util.tree_map(jnp.add, acc, grad_of(u, part)), None),
            jax.tree_util.tree_map(jnp.zeros_like, u),
            parts,
        )[0]
        grads = jax.tree_util.tree_map(lambda g: g / parts.shape[0], total)
        updates, opt_state = opt.update(grads, opt_state, u)
        return (optax.apply_updates(u, updates), opt_state), None

    (u, _), _ = jax.lax.scan(step, (u0, opt.init(u0)), jax.random.split(key, params.steps))
    return u


__all__ = ["loss", "optimise", "take"]
