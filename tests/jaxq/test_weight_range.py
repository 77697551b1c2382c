import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
from jaxq import QScheme
from jaxq.calibrate import quantize_weight
from jaxq.numerics import fake_quant
from jaxq.qparams import qparams_from_range
from jaxq.weight_range import MIN_RATIO, channel_range, resolved_range

SCHEMES = [QScheme(4, True, True, axis=0), QScheme(4, True, False, axis=0), QScheme(3, False, False, axis=0)]


def _row_errors(flat, lo, hi, scheme):
    qp = qparams_from_range(lo, hi, scheme)
    return np.sum((np.asarray(fake_quant(flat, qp)) - flat) ** 2, axis=1)


@settings(max_examples=25, deadline=None)
@given(
    flat=hnp.arrays(np.float32, (5, 12), elements=st.floats(-4, 4, width=32)),
    scheme=st.sampled_from(SCHEMES),
)
def test_mse_range_never_rounds_worse_than_minmax_and_only_shrinks(flat, scheme):
    lo0, hi0 = channel_range(flat, scheme, "minmax")
    lo, hi = channel_range(flat, scheme, "mse")
    assert np.all(_row_errors(flat, lo, hi, scheme) <= _row_errors(flat, lo0, hi0, scheme))
    for a, b in ((lo, lo0), (hi, hi0)):
        assert np.all(np.abs(np.asarray(a)) <= np.abs(np.asarray(b)))
        assert np.all(np.abs(np.asarray(a)) >= MIN_RATIO * np.abs(np.asarray(b)) - 1e-7)


def test_an_outlier_channel_is_clipped_and_rounds_the_rest_finer():
    rng = np.random.default_rng(0)
    flat = rng.standard_normal((2, 256)).astype(np.float32)
    flat[0, 0] = 8.0  # one outlier: min-max would spend the 4-bit grid on it
    scheme = SCHEMES[0]
    lo0, hi0 = channel_range(flat, scheme, "minmax")
    lo, hi = channel_range(flat, scheme, "mse")
    assert float(hi[0]) < 0.7 * float(hi0[0])
    errors, errors0 = _row_errors(flat, lo, hi, scheme), _row_errors(flat, lo0, hi0, scheme)
    assert errors[0] < 0.75 * errors0[0] and errors[1] < 0.75 * errors0[1]


def test_a_constant_or_zero_channel_keeps_its_exact_value():
    flat = np.array([[0.5] * 8, [0.0] * 8, [-1.0] * 8], np.float32)
    for scheme in SCHEMES[:2]:
        lo, hi = channel_range(flat, scheme, "mse")
        qp = qparams_from_range(lo, hi, scheme)
        np.testing.assert_allclose(np.asarray(fake_quant(flat, qp)), flat, atol=1e-6)


def test_many_weights_quantized_together_equal_one_at_a_time_under_mse():
    rng = np.random.default_rng(1)
    shapes = [(16, 3, 3, 3), (8, 5), (32, 16, 1, 1), (10, 64)]
    ws = {f"l{i}": jnp.asarray(rng.standard_normal(s).astype(np.float32)) for i, s in enumerate(shapes)}
    scheme = SCHEMES[1]
    out = jaxq.quantize_weights(ws, scheme, "mse")
    minmax = jaxq.quantize_weights(ws, scheme)
    assert any(not np.array_equal(out[n].qparams.scale, minmax[n].qparams.scale) for n in ws)
    for name, w in ws.items():
        ref = quantize_weight(w, scheme, "mse")
        np.testing.assert_allclose(out[name].qparams.scale, np.asarray(ref.qparams.scale), rtol=1e-6)
        assert np.mean(np.asarray(out[name].q) == np.asarray(ref.q)) > 0.99


def test_an_unknown_range_is_refused_by_name():
    with pytest.raises(ValueError, match="'percentile'"):
        channel_range(np.ones((2, 3), np.float32), SCHEMES[0], "percentile")


def test_config_resolves_mse_up_to_four_bits_and_names_a_bad_value():
    assert jaxq.QuantConfig(w_bit=4).weight_range_for(4) == "mse"
    assert jaxq.QuantConfig(w_bit=3).weight_range_for(3) == "mse"
    assert jaxq.QuantConfig(w_bit=6).weight_range_for(6) == "minmax"
    assert jaxq.QuantConfig().weight_range_for(8) == "minmax"
    assert jaxq.QuantConfig(w_range="minmax").weight_range_for(4) == "minmax"
    assert jaxq.QuantConfig(w_range="mse").weight_range_for(8) == "mse"
    with pytest.raises(ValueError, match=r"QuantConfig\.w_range='l2'.*'minmax', 'mse'"):
        jaxq.QuantConfig(w_range="l2")
    assert [resolved_range(None, b) for b in (2, 4, 5, 8)] == ["mse", "mse", "minmax", "minmax"]
    with pytest.raises(ValueError, match="'l2'"):
        resolved_range("l2", 4)
