import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq.sensitivity as js
from jaxq.model_metrics import sample_distances


def _pad(x, size=2048):
    buf = np.zeros(size, np.float32)
    buf[: x.size] = x
    return jnp.asarray(buf)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(0, 10_000))
def test_streamed_metrics_match_numpy(batches, seed):
    rng = np.random.default_rng(seed)
    f = [rng.standard_normal(rng.integers(1, 2000)).astype(np.float32) * 3 + 1 for _ in range(batches)]
    q = [x + rng.standard_normal(x.size).astype(np.float32) * 0.1 for x in f]
    stats = js.init_stats()
    for a, b in zip(f, q):
        stats = js.update_stats(stats, _pad(a), _pad(b), np.float32(a.size))
    m = {k: float(v) for k, v in js.finalize_metrics(stats).items()}
    F, Q = np.concatenate(f).astype(np.float64), np.concatenate(q).astype(np.float64)
    mse = np.mean((Q - F) ** 2)
    np.testing.assert_allclose(m["mse"], mse, rtol=1e-3)
    np.testing.assert_allclose(m["relative_mse"], mse / F.var(), rtol=1e-3)
    np.testing.assert_allclose(m["cosine"], F @ Q / np.sqrt((F @ F) * (Q @ Q)), rtol=1e-4)


def test_sample_distances_are_kl_per_row_and_cosine_per_sample():
    p = jnp.array([[2.0, 0.0, -1.0]])
    assert float(sample_distances(p, p)[0]) == 0.0
    assert float(sample_distances(p, p[:, ::-1])[0]) > 0.5
    h = jnp.stack([jnp.ones((2, 3)), jnp.arange(6.0).reshape(2, 3)])  # [samples, tokens, dim]
    d = np.asarray(sample_distances(h, h.at[1].multiply(-1.0).at[0].multiply(2.0)))
    np.testing.assert_allclose(d, [0.0, 2.0], atol=1e-6)


def _draws(sample, out, n=4000):
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.vmap(lambda k: sample(k, out))(keys), np.float64)


def test_kl_cotangent_covariance_is_the_hessian_of_kl():
    """Cov(c) = diag(p) − ppᵀ, the Hessian of KL(p ‖ softmax(z)) at the float logits."""
    logits = jnp.array([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, -2.0]])
    c = _draws(js.kl_cotangent, logits)
    p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    for row in range(2):
        hessian = np.diag(p[row]) - np.outer(p[row], p[row])
        np.testing.assert_allclose(np.cov(c[:, row].T), hessian, atol=0.02)
        np.testing.assert_allclose(c[:, row].sum(-1), 0.0, atol=1e-5)  # a softmax shift changes nothing
    # second order: ½·E[(c·Δz)²] is KL for a small change of the logits
    dz = 0.05 * np.array([[1.0, -2.0, 0.5, 0.0], [0.3, 0.0, -1.0, 2.0]])
    estimate = 0.5 * np.mean(np.sum(np.einsum("nrc,rc->nr", c, dz) ** 2, axis=1)) / 2
    exact = float(jnp.mean(sample_distances(logits, logits + dz)))
    np.testing.assert_allclose(estimate, exact, rtol=0.1)


def test_kl_cotangent_estimate_stays_tight_when_an_unlikely_class_moves():
    """`(c·Δz)²` of one draw has relative variance 2 (Gaussian), not the `~1/p_k` of a
    categorical draw `onehot(y) − p`: one backward pass ranks a layer that moves a rare class."""
    logits = jnp.array([[8.0, 0.0, 0.0, 0.0, 0.0]])  # p of each unlikely class ≈ 3e-4
    dz = np.array([[0.0, 0.0, 0.0, 0.0, 1.0]])
    t2 = np.einsum("nrc,rc->n", _draws(js.kl_cotangent, logits, n=20000), dz) ** 2
    assert np.var(t2) / np.mean(t2) ** 2 == pytest.approx(2.0, rel=0.15)


def test_cosine_cotangent_is_orthogonal_to_each_sample_and_estimates_its_distance():
    f = jnp.array([[[1.0, 2.0], [-1.0, 0.5]], [[0.5, 0.0], [3.0, 1.0]]])  # [samples, tokens, dim]
    c = _draws(js.cosine_cotangent, f)
    np.testing.assert_allclose(np.einsum("nstd,std->ns", c, np.asarray(f, np.float64)), 0.0, atol=1e-4)
    dz = 0.01 * np.array([[[0.5, -1.0], [2.0, 0.0]], [[1.0, 1.0], [0.0, -3.0]]])
    estimate = 0.5 * np.mean(np.einsum("nstd,std->ns", c, dz) ** 2, axis=0)
    exact = np.asarray(sample_distances(f, f + dz))
    np.testing.assert_allclose(estimate, exact, rtol=0.1)


def test_cotangents_are_deterministic_for_a_key():
    f = jnp.arange(12.0).reshape(3, 4)
    for sample in (js.kl_cotangent, js.cosine_cotangent):
        a, b = sample(jax.random.key(3), f), sample(jax.random.key(3), f)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(sample(jax.random.key(4), f)))
