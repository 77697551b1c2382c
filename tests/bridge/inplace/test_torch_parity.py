"""Bit-exact parity of jaxq's fake-quant with torch.fake_quantize_* (docs/design.md §3)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxq import QParams, QScheme, fake_quant, qparams_from_range, quantize_weight

N = 120_000
SCHEMES = [QScheme(b, sg, sy) for b, sg, sy in itertools.product((2, 4, 8), (True, False), (True, False))]
fq = jax.jit(fake_quant)


def _values(rng, s, o, qmin, qmax):
    """Random values over and beyond the grid, plus every exact tie (q + ½)·s."""
    span = (qmax - qmin) * s
    x = rng.uniform(-0.75 * span, 0.75 * span, N).astype(np.float32) + np.float32((qmin + qmax) / 2 - o) * s
    ties = ((np.arange(qmin - 2, qmax + 2) - o + 0.5) * np.float64(s)).astype(np.float32)
    return np.concatenate([x, ties, -ties, np.float32([0.0, -0.0, 1e30, -1e30])])


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_per_tensor_bit_exact(scheme):
    rng = np.random.default_rng(scheme.bits * 7 + scheme.signed * 2 + scheme.symmetric)
    for lo, hi in [(-1.3, 2.7), (0.0, 6.0), (-0.013, 0.004), (-350.0, 20.0)]:
        qp = qparams_from_range(lo, hi, scheme)
        s, o = float(qp.scale), int(qp.offset)
        x = _values(rng, s, o, scheme.qmin, scheme.qmax)
        ours = np.asarray(fq(x, qp))
        ref = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), s, o, scheme.qmin, scheme.qmax).numpy()
        assert x.size >= 100_000
        np.testing.assert_array_equal(ours, ref)
        ref_t = torch.fake_quantize_per_tensor_affine(
            torch.from_numpy(x), torch.tensor([s]), torch.tensor([o], dtype=torch.int32), scheme.qmin, scheme.qmax
        ).numpy()
        np.testing.assert_array_equal(ours, ref_t)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_per_channel_bit_exact(scheme):
    scheme = QScheme(scheme.bits, scheme.signed, scheme.symmetric, axis=0)
    rng = np.random.default_rng(scheme.bits)
    channels = 64
    w = (rng.standard_normal((channels, N // channels + 1)) * rng.uniform(0.001, 5, (channels, 1))).astype(np.float32)
    w += rng.uniform(-1, 1, (channels, 1)).astype(np.float32) * np.abs(w).max(1, keepdims=True)
    qp = quantize_weight(jnp.asarray(w), scheme).qparams
    s = np.asarray(qp.scale)
    ties = ((np.arange(-20, 20)[None, :] + 0.5) * s[:, None].astype(np.float64)).astype(np.float32)
    w = np.concatenate([w, ties], axis=1)
    ours = np.asarray(fq(w, qp))
    ref = torch.fake_quantize_per_channel_affine(
        torch.from_numpy(w),
        torch.from_numpy(s.copy()),
        torch.from_numpy(np.asarray(qp.offset).copy()),
        0,
        scheme.qmin,
        scheme.qmax,
    ).numpy()
    assert w.size >= 100_000
    np.testing.assert_array_equal(ours, ref)


def test_jax_division_would_not_be_exact():
    """Documents why numerics.py multiplies by the reciprocal: x/s differs from torch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2_000_000).astype(np.float32) * 3
    mismatches = 0
    for s in np.float32([0.0123, 0.0377, 0.00917, 0.2113]):
        qp = QParams(jnp.float32(s), jnp.int32(0), QScheme(8, True, True))
        ref = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(s), 0, -128, 127).numpy()
        np.testing.assert_array_equal(np.asarray(fq(x, qp)), ref)
        by_division = np.clip(np.round(x / s), -128, 127) * s
        mismatches += int((by_division != ref).sum())
    assert mismatches > 0


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_wrapper_cpu_fast_path_is_bit_exact(scheme):
    """LayerQuantizer's eager CPU activation path equals torch's op bit for bit (sign of
    zero included) on finite input; it keeps NaN where torch writes qmin."""
    from bridge.inplace.fakequant import fake_quant_per_tensor_cpu

    rng = np.random.default_rng(scheme.bits * 3 + scheme.signed)
    for lo, hi in [(-1.3, 2.7), (0.0, 6.0), (-0.013, 0.004), (-350.0, 20.0)]:
        qp = qparams_from_range(lo, hi, scheme)
        s, o = float(qp.scale), int(qp.offset)
        x = torch.from_numpy(
            np.concatenate([_values(rng, s, o, scheme.qmin, scheme.qmax), np.float32([np.inf, -np.inf])])
        )
        ref = torch.fake_quantize_per_tensor_affine(x, s, o, scheme.qmin, scheme.qmax)
        ours = fake_quant_per_tensor_cpu(x, s, o, scheme.qmin, scheme.qmax)
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    assert fake_quant_per_tensor_cpu(torch.tensor([float("nan")]), 0.1, 0, -128, 127).isnan().all()


def test_wrapper_uses_torch_op_when_traced_or_training():
    """Export, compile and gradients see torch's fake-quant op (QDQ pairs, straight-through)."""
    from bridge.inplace.fakequant import _eager_cpu_inference

    x = torch.randn(4)
    assert _eager_cpu_inference(x)
    assert not _eager_cpu_inference(x.requires_grad_())
    with torch.no_grad():
        assert _eager_cpu_inference(x)
    seen = []
    torch.compile(lambda t: seen.append(_eager_cpu_inference(t)) or t, backend="eager")(torch.randn(4))
    assert seen == [False]
