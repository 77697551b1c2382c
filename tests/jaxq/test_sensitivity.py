import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq.sensitivity as js


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


def test_logits_kl_and_cosine_distance():
    p = jnp.array([[2.0, 0.0, -1.0]])
    assert float(js.logits_kl(p, p)) == 0.0
    assert float(js.logits_kl(p, p[:, ::-1])) > 0.5
    assert abs(float(js.cosine_distance(p, 2 * p))) < 1e-6
