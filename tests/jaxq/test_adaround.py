import numpy as np
import jax.numpy as jnp

import jaxq
from jaxq import QScheme
from jaxq.adaround import AdaRoundParams, adaround, output_error, row_moments

ACT = QScheme(8, False, False, None)
W4 = QScheme(4, True, True, 0)


def _correlated_rows(seed, m=1024, d=32):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * 0.3 + np.eye(d)
    return jnp.asarray((np.abs(rng.standard_normal((m, d))) @ mix).astype(np.float32))[:, None, :]


def test_output_error_from_moments_equals_direct_numpy():
    rows = _correlated_rows(0, m=200, d=16)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, 6, 16)).astype(np.float32)
    w_tilde = w + 0.05 * rng.standard_normal(w.shape).astype(np.float32)
    act = jaxq.qparams_from_range(rows.min(), rows.max(), ACT)
    x_hat = np.asarray(jaxq.fake_quant(rows, act)[:, 0], np.float64)
    direct = np.mean(np.sum((x_hat @ w_tilde[0].T - x_hat @ w[0].T) ** 2, axis=1))
    got = float(output_error(jnp.asarray(w_tilde), jnp.asarray(w), row_moments(rows, act)))
    np.testing.assert_allclose(got, direct, rtol=1e-4)


def test_learned_codes_beat_nearest_and_stay_on_floor_or_ceil():
    rows = _correlated_rows(2)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((16, 32)).astype(np.float32) * 0.1)
    qw = jaxq.quantize_weight(w, W4)
    res = adaround(w, (1, 16, 32), qw.qparams, row_moments(rows, None), AdaRoundParams(steps=500))
    assert float(res.error_after) < 0.8 * float(res.error_before)
    x = np.asarray(w) / np.asarray(qw.qparams.scale)[:, None]
    q = np.asarray(res.q)
    assert np.all((q == np.floor(x)) | (q == np.floor(x) + 1) | (q == W4.qmin) | (q == W4.qmax))
    direct = float(
        output_error(
            jnp.asarray(jaxq.dequantize(res.q, qw.qparams)).reshape(1, 16, 32),
            w.reshape(1, 16, 32),
            row_moments(rows, None),
        )
    )
    np.testing.assert_allclose(direct, float(res.error_after), rtol=1e-4)


def test_wide_rows_use_the_factor_and_give_the_same_codes():
    """Rows wider than they are many keep `R` (`Ĥ = RᵀR`) instead of `Ĥ`: same error, same codes."""
    from jaxq.adaround import Moments, RowFactor

    rng = np.random.default_rng(3)
    rows = jnp.asarray(rng.normal(size=(24, 1, 40)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(8, 40)).astype(np.float32))
    qw = jaxq.quantize_weight(w, jaxq.QScheme(bits=4, signed=True, symmetric=True, axis=0))
    factor = row_moments(rows, None)
    assert isinstance(factor, RowFactor) and factor.r.shape == (1, 24, 40)
    full = Moments(jnp.einsum("mgd,mge->gde", rows, rows) / 24)
    w_tilde = jnp.asarray(jaxq.dequantize(qw.q, qw.qparams)).reshape(1, 8, 40)
    np.testing.assert_allclose(
        float(output_error(w_tilde, w.reshape(1, 8, 40), factor)),
        float(output_error(w_tilde, w.reshape(1, 8, 40), full)),
        rtol=1e-4,
    )
    p = AdaRoundParams(steps=200)
    a = adaround(w, (1, 8, 40), qw.qparams, factor, p)
    b = adaround(w, (1, 8, 40), qw.qparams, full, p)
    assert np.mean(np.asarray(a.q) == np.asarray(b.q)) > 0.98


def test_adaround_refines_gptq_codes():
    """Started from GPTQ's codes, AdaRound reports GPTQ's error as its error before (so the
    step keeps the better of the two) and learns codes better than nearest rounding."""
    from jaxq.gptq import gptq_codes

    rows = _correlated_rows(4)
    w = jnp.asarray(np.random.default_rng(5).standard_normal((16, 32)).astype(np.float32) * 0.1)
    qw = jaxq.quantize_weight(w, W4)
    mom = row_moments(rows, None)
    per_col = lambda v: jnp.broadcast_to(v[:, None], (16, 32))  # noqa: E731
    start = gptq_codes(w, mom.h_hat[0], per_col(qw.qparams.scale), per_col(qw.qparams.offset), W4.qmin, W4.qmax)
    gptq_err = float(output_error(jaxq.dequantize(start, qw.qparams).reshape(1, 16, 32), w.reshape(1, 16, 32), mom))
    rtn = adaround(w, (1, 16, 32), qw.qparams, mom, AdaRoundParams(steps=1))
    res = adaround(w, (1, 16, 32), qw.qparams, mom, AdaRoundParams(steps=500), start=start)
    x = np.floor(np.asarray(w) / np.asarray(qw.qparams.scale)[:, None])
    inside = (np.asarray(start) >= x) & (np.asarray(start) <= x + 1)
    if inside.all():
        np.testing.assert_allclose(float(res.error_before), gptq_err, rtol=1e-4)
    assert float(res.error_before) < float(rtn.error_before)  # the start is GPTQ's, not nearest
    assert float(res.error_after) < 0.8 * float(rtn.error_before)
