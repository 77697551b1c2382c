"""Bias correction: δ = (W − Ŵ)·E[row] against NumPy, and the mean output it restores."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import jaxq
from jaxq.bias_correction import bias_shift, bias_shift_bucket


def _quantized(w, bits):
    scheme = jaxq.QScheme(bits=bits, signed=True, symmetric=True, axis=0)
    return jaxq.quantize_weight(jnp.asarray(w), scheme)


def test_matches_numpy_reference_grouped():
    rng = np.random.default_rng(0)
    g, o, d = 4, 3, 9  # a grouped conv viewed as [g, out/g, d]
    wg = rng.normal(size=(g, o, d)).astype(np.float32)
    w_hat = (wg + rng.normal(scale=0.05, size=wg.shape)).astype(np.float32)
    mean = rng.normal(size=(g, d)).astype(np.float32)
    want = np.concatenate([(wg[i] - w_hat[i]) @ mean[i] for i in range(g)])
    np.testing.assert_allclose(np.asarray(bias_shift(mean, wg, w_hat)), want, rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=25)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 3, 4, 8]),
    shift=st.floats(-2, 2, allow_subnormal=False, width=32),
)
def test_corrected_layer_has_the_float_mean_output(seed, bits, shift):
    """On the rows it was computed from, E[Ŵx + b + δ] = E[Wx + b] (to float rounding)."""
    rng = np.random.default_rng(seed)
    rows = (rng.normal(size=(256, 1, 12)) + shift).astype(np.float32)  # non-zero mean input
    w = rng.normal(size=(5, 12)).astype(np.float32)
    qw = _quantized(w, bits)
    w_hat = np.asarray(jaxq.dequantize(qw.q, qw.qparams))
    delta = np.asarray(bias_shift(rows.mean(0), w[None], w_hat[None]))
    x = rows[:, 0].astype(np.float64)
    before = (x @ w_hat.T).mean(0) - (x @ w.T).mean(0)
    after = (x @ w_hat.T + delta).mean(0) - (x @ w.T).mean(0)
    assert np.all(np.abs(after) <= 1e-4 * (1 + np.abs(x @ w.T).mean()))
    assert np.abs(after).sum() <= np.abs(before).sum() + 1e-6


def test_zero_when_weights_are_exact():
    w = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    assert np.all(np.asarray(bias_shift(np.ones((1, 4), np.float32), w, w)) == 0)


def test_bucket_is_vmapped_and_compiles_once():
    rng = np.random.default_rng(1)
    args = [rng.normal(size=(3, 1, 4, 6)).astype(np.float32) for _ in range(2)]
    mean = rng.normal(size=(3, 1, 6)).astype(np.float32)
    out = bias_shift_bucket(mean, *args)
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(out[i]), np.asarray(bias_shift(mean[i], args[0][i], args[1][i])), rtol=1e-6
        )
    with jaxq.compile_count() as c:
        bias_shift_bucket(mean + 1, *args).block_until_ready()
    assert c.count == 0


def test_accuracy_bias_corrections_over_buckets():
    rng = np.random.default_rng(2)
    weights = {
        "a": rng.normal(size=(4, 6)).astype(np.float32),
        "b": rng.normal(size=(4, 6)).astype(np.float32),
        "c": rng.normal(size=(8, 2, 3, 3)).astype(np.float32),
    }
    scheme = jaxq.QScheme(bits=4, signed=True, symmetric=True, axis=0)
    quantized = jaxq.quantize_weights({n: jnp.asarray(w) for n, w in weights.items()}, scheme)
    grouped = {n: np.reshape(w, (1, w.shape[0], -1)) for n, w in weights.items()}
    means = {n: rng.normal(size=(1, g.shape[-1])).astype(np.float32) for n, g in grouped.items()}
    found = jaxq.accuracy.bias_corrections(means, grouped, quantized)
    for n in weights:
        w_hat = np.asarray(jaxq.dequantize(quantized[n].q, quantized[n].qparams)).reshape(grouped[n].shape)
        np.testing.assert_allclose(np.asarray(found[n]), (grouped[n][0] - w_hat[0]) @ means[n][0], rtol=1e-4, atol=1e-6)


def test_bias_corrections_pack_channels_of_every_layer_and_match_bias_shift():
    """Grouped (depthwise, two groups), per-tensor and differently wide layers: δ of each equals
    `bias_shift`; widths 5–8 share one padded width, so one program serves them all. A
    weight quantized along another axis, and weights above `PACKED_MAX` values, take the
    per-shape path with the same result."""
    rng = np.random.default_rng(3)
    per_channel = jaxq.QScheme(bits=4, signed=True, symmetric=False, axis=0)
    cases = {  # name: (weight, groups, scheme)
        "dense": (rng.normal(size=(6, 7)), 1, per_channel),
        "narrow": (rng.normal(size=(5, 5)), 1, per_channel),
        "depthwise": (rng.normal(size=(4, 1, 2, 4)), 4, per_channel),
        "two_groups": (rng.normal(size=(4, 2, 1, 3)), 2, per_channel),
        "per_tensor": (rng.normal(size=(3, 6)), 1, per_channel.with_axis(None)),
        "axis1": (rng.normal(size=(4, 6)), 1, per_channel.with_axis(1)),
        "large_a": (rng.normal(size=(257, 256)), 1, per_channel),
        "large_b": (rng.normal(size=(257, 256)), 1, per_channel),
    }
    quantized, grouped, means = {}, {}, {}
    for n, (w, g, scheme) in cases.items():
        w = w.astype(np.float32)
        if scheme.axis is None:
            qp = jaxq.qparams_from_range(jnp.float32(w.min()), jnp.float32(w.max()), scheme)
            quantized[n] = jaxq.QuantizedWeight(qp, jaxq.quantize(jnp.asarray(w), qp))
        else:
            quantized[n] = jax.jit(jaxq.quantize_weight, static_argnums=1)(jnp.asarray(w), scheme)
        grouped[n] = w.reshape(g, w.shape[0] // g, -1)
        means[n] = rng.normal(size=(g, grouped[n].shape[-1])).astype(np.float32)
    jax.clear_caches()  # other tests of this module compile programs of the same widths
    jaxq.executables.clear()
    with jaxq.compile_count() as c:
        found = jaxq.accuracy.bias_corrections(means, grouped, quantized)
    assert c.count + c.loaded == 3  # packed rows of width 8; the axis-1 layer's bucket; the large layers' bucket
    for n, (w, _g, _scheme) in cases.items():
        qp = quantized[n].qparams
        w_hat = (np.asarray(quantized[n].q) - _along(qp.offset, qp, w.ndim)) * _along(qp.scale, qp, w.ndim)
        want = np.einsum("god,gd->go", grouped[n] - w_hat.reshape(grouped[n].shape), means[n]).reshape(-1)
        np.testing.assert_allclose(np.asarray(found[n]), want, rtol=1e-5, atol=1e-6)


def _along(v, qp, ndim):
    v = np.asarray(v, np.float32)
    if qp.scheme.axis is None or v.ndim == 0:
        return v
    return v.reshape([-1 if i == qp.scheme.axis else 1 for i in range(ndim)])
