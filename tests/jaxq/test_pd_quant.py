"""`jaxq.pd_quant`: input step sizes learned on a model's output distance."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import pd_quant as pd
from jaxq.keep_acc import PdQuant
from jaxq.model_quant import fake_quant_ste

QMIN, QMAX = jnp.float32(0.0), jnp.float32(15.0)  # unsigned 4-bit inputs


def _toy(seed=0, n=64, d=12, classes=5):
    """A one-layer classifier whose input quantizer starts with a step too small (clipping)."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, d))).astype(np.float32) * 2.0
    w = rng.normal(size=(d, classes)).astype(np.float32)
    s0 = jnp.float32(0.05)  # covers [0, 0.75]; the inputs reach ~6

    def apply(u, inputs):
        xq = fake_quant_ste(inputs, s0 * jnp.exp(u["fc"]), jnp.float32(0.0), QMIN, QMAX)
        return xq @ w

    return apply, jnp.asarray(x), jnp.asarray(x @ w)


def test_the_step_size_grows_out_of_clipping_and_the_output_distance_falls():
    apply, x, target = _toy()
    u0 = {"fc": jnp.float32(0.0)}
    fitted = jnp.arange(64, dtype=jnp.int32)
    u = pd.optimise(apply, u0, x, target, fitted, jax.random.PRNGKey(0), PdQuant(steps=300, batch=16, lr=2e-2))
    before = float(pd.loss(apply, u0, x, target, None))
    after = float(pd.loss(apply, u, x, target, None))
    assert float(u["fc"]) > 1.0  # the step size grew by e¹ or more
    assert after < 0.2 * before, (before, after)


def test_mini_batches_come_from_the_fitted_samples_only_and_a_seed_repeats():
    apply, x, target = _toy(1)
    held = np.arange(64) % 4 == 0
    poisoned = jnp.where(jnp.asarray(held)[:, None], jnp.nan, target)  # a held-out sample in a step → NaN
    fitted = jnp.asarray(np.nonzero(~held)[0].astype(np.int32))
    settings = PdQuant(steps=50, batch=8, lr=1e-2)
    u1 = pd.optimise(apply, {"fc": jnp.float32(0.0)}, x, poisoned, fitted, jax.random.PRNGKey(3), settings)
    u2 = pd.optimise(apply, {"fc": jnp.float32(0.0)}, x, poisoned, fitted, jax.random.PRNGKey(3), settings)
    assert np.isfinite(float(u1["fc"])) and float(u1["fc"]) != 0.0
    assert float(u1["fc"]) == float(u2["fc"])


def test_optimise_is_jittable_with_the_samples_as_arguments():
    apply, x, target = _toy(2)
    run = jax.jit(
        lambda x, t, f: pd.optimise(apply, {"fc": jnp.float32(0.0)}, x, t, f, jax.random.PRNGKey(0), PdQuant(steps=5))
    )
    fitted = jnp.arange(64, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(run(x, target, fitted)["fc"]), np.asarray(run(x, target, fitted)["fc"]))


def test_micro_batches_give_the_same_steps():
    apply, x, target = _toy(3)
    fitted = jnp.arange(64, dtype=jnp.int32)
    settings = PdQuant(steps=20, batch=8, lr=1e-2)
    whole = pd.optimise(apply, {"fc": jnp.float32(0.0)}, x, target, fitted, jax.random.PRNGKey(1), settings)
    parts = pd.optimise(apply, {"fc": jnp.float32(0.0)}, x, target, fitted, jax.random.PRNGKey(1), settings, None, 2)
    np.testing.assert_allclose(float(parts["fc"]), float(whole["fc"]), rtol=1e-5)
