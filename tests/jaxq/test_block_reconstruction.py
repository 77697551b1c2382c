import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from jaxq import block_reconstruction as br
from jaxq.calibrate import quantize_weight
from jaxq.scheme import QScheme


def _setup(seed=0, out=6, d=10, bits=4):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out, d)).astype(np.float32)
    scheme = QScheme(bits=bits, signed=True, symmetric=True, axis=0)
    qw = quantize_weight(jnp.asarray(w), scheme)
    return w, qw, scheme


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 4, 8]))
def test_initial_soft_weight_is_the_float_weight_inside_the_grid(seed, bits):
    w, qw, scheme = _setup(seed, bits=bits)
    sw, v0 = br.soft_weight_init(w, qw.qparams.scale, qw.qparams.offset, scheme.qmin, scheme.qmax)
    soft = np.asarray(br.soft_weight(sw, v0))
    s = np.asarray(qw.qparams.scale)[:, None]
    inside = (w / s > scheme.qmin) & (w / s < scheme.qmax - 1)
    np.testing.assert_allclose(soft[inside], w[inside], atol=2e-4 * np.broadcast_to(s, w.shape)[inside].max())


def test_hard_codes_round_h_at_one_half_and_match_the_hard_weight():
    w, qw, scheme = _setup(1)
    sw, v0 = br.soft_weight_init(w, qw.qparams.scale, qw.qparams.offset, scheme.qmin, scheme.qmax)
    codes = np.asarray(br.hard_codes(sw, v0))
    np.testing.assert_array_equal(codes, np.asarray(qw.q))  # h(V₀) = fractional part → round to nearest
    hard = np.asarray(br.soft_weight(sw, v0, hard=True))
    np.testing.assert_allclose(
        hard, (codes - np.asarray(qw.qparams.offset)[:, None]) * np.asarray(qw.qparams.scale)[:, None], rtol=1e-6
    )


def test_rounding_reg_is_zero_only_at_hard_values_and_beta_anneals():
    assert float(br.rounding_reg(jnp.array([1e4, -1e4]), 2.0)) == 0.0
    assert float(br.rounding_reg(jnp.array([0.0]), 2.0)) > 0.9
    p = br.ReconParams(steps=100, schedule=br.RoundingSchedule(warmup=0.2))
    beta = lambda step: float(br.beta_schedule(step, p.steps, p.schedule))  # noqa: E731
    assert beta(0) == 20.0 and beta(20) == 20.0 and beta(100) == 2.0


def test_optimise_lowers_the_output_error_of_a_two_layer_block():
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32) / 4
    x = jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32))
    target = jax.nn.relu(x @ w1.T) @ w2.T
    scheme = QScheme(bits=3, signed=True, symmetric=True, axis=0)
    soft, v0 = {}, {}
    for k, w in (("a", w1), ("b", w2)):
        qw = quantize_weight(jnp.asarray(w), scheme)
        soft[k], v0[k] = br.soft_weight_init(w, qw.qparams.scale, qw.qparams.offset, scheme.qmin, scheme.qmax)

    def apply(lv, inputs, key):
        h = jax.nn.relu(inputs @ br.soft_weight(soft["a"], lv.v["a"]).T)
        if key is not None:  # QDrop-style: the hidden activation half the time on a coarse grid
            h = jnp.where(jax.random.bernoulli(key, 0.5, h.shape), jnp.round(h * 4) / 4, h)
        return h @ br.soft_weight(soft["b"], lv.v["b"]).T

    learned = br.Learned(v0, {"a": jnp.float32(0.0)})
    for keep in (1.0, 0.5):
        p = br.ReconParams(steps=300, batch=32, keep=keep)
        out, before, after = jax.jit(lambda lv, x, y, k: br.optimise(apply, lv, x, y, k, p))(
            learned, x, target, jax.random.PRNGKey(0)
        )
        assert float(after) < 0.8 * float(before)
        for k in ("a", "b"):
            h = np.asarray(jax.nn.sigmoid(out.v[k]) * 1.2 - 0.1)
            assert np.mean((h < 0.01) | (h > 0.99)) > 0.3  # the regulariser pushes h to 0 or 1 (from ~2 % at V₀)
