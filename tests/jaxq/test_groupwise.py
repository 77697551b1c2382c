"""Group-wise weights (`jaxq.groupwise`): each group's grid is its own min–max."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxq.calibrate import quantize_weight
from jaxq.groupwise import check_group_size, dequantize_codes, group_fake_quant, group_qparams, rtn
from jaxq.scheme import QScheme


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), groups=st.sampled_from([1, 2, 4]), bits=st.sampled_from([3, 4, 8]), sym=st.booleans())
def test_each_group_is_a_per_channel_quantizer_of_its_columns(seed, groups, bits, sym):
    w = np.random.default_rng(seed).normal(size=(6, 32)).astype(np.float32)
    scheme = QScheme(bits=bits, symmetric=sym, axis=0)
    g = 32 // groups
    codes, qp = rtn(w, scheme, g)
    assert qp.scale.shape == (6, groups) and codes.shape == (6, 32)
    for k in range(groups):
        ref = quantize_weight(w[:, k * g : (k + 1) * g], scheme)
        np.testing.assert_array_equal(np.asarray(codes)[:, k * g : (k + 1) * g], np.asarray(ref.q))
        np.testing.assert_array_equal(np.asarray(qp.scale)[:, k], np.asarray(ref.qparams.scale))
    np.testing.assert_array_equal(np.asarray(dequantize_codes(codes, qp)), np.asarray(group_fake_quant(w, qp)))


def test_smaller_groups_give_smaller_error():
    w = np.random.default_rng(0).standard_t(3, size=(64, 256)).astype(np.float32)
    scheme = QScheme(bits=4, axis=0)
    err = {
        g: float(np.mean((np.asarray(group_fake_quant(w, group_qparams(w, scheme, g))) - w) ** 2))
        for g in (None, 128, 32)
    }
    assert err[32] < err[128] < err[None]


def test_group_size_must_tile_the_row():
    with pytest.raises(ValueError, match="group_size=48 does not divide the 128 input columns of q_proj"):
        check_group_size(128, 48, "q_proj")
    with pytest.raises(ValueError, match="an int ≥ 1"):
        check_group_size(128, 0)
    assert check_group_size(128, None) == 128


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), groups=st.sampled_from([1, 2, 8]), sym=st.booleans())
def test_group_rows_through_the_per_channel_quantizer_are_rtn(seed, groups, sym):
    """The calibrator's path (`group_rows` → per-channel `quantize_weights` → `from_group_rows`)
    gives `rtn`'s codes and scales, and `group_params` gives the scales back per group."""
    from jaxq.calibrate import quantize_weights
    from jaxq.groupwise import from_group_rows, group_params, group_rows

    w = np.random.default_rng(seed).normal(size=(5, 64)).astype(np.float32)
    scheme = QScheme(bits=4, symmetric=sym, axis=0)
    g = 64 // groups
    rows = quantize_weights({"w": group_rows(w, g)}, scheme, "minmax")["w"]
    qw = from_group_rows(rows, w.shape)
    codes, qp = rtn(w, scheme, g)
    np.testing.assert_array_equal(np.asarray(qw.q), np.asarray(codes))
    assert np.shape(qw.qparams.scale) == (5, 64)
    scale, offset = group_params(np.asarray(qw.qparams.scale), np.asarray(qw.qparams.offset), g)
    np.testing.assert_array_equal(scale, np.asarray(qp.scale))
    np.testing.assert_array_equal(offset, np.asarray(qp.offset))
