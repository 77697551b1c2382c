"""Memory-lean multi-layer glue of `jaxq.accuracy`: the same numbers as the whole-row forms."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import QScheme
from jaxq.accuracy import MOMENT_CHUNK, LayerRows, easy_quant_layers, layer_moment
from jaxq.adaround import Moments, RowFactor, row_moments
from jaxq.easyquant import ROWS_USED


def _act(rows):
    return jaxq.qparams_from_range(jnp.min(rows), jnp.max(rows), QScheme(bits=8, signed=False, symmetric=False))


@pytest.mark.parametrize("m", [MOMENT_CHUNK - 3, 2 * MOMENT_CHUNK, 3 * MOMENT_CHUNK + 17])
@pytest.mark.parametrize("quantized", [False, True])
def test_layer_moment_in_chunks_equals_the_whole_row_moment(m, quantized):
    rows = np.random.default_rng(m).normal(size=(m, 3, 20)).astype(np.float32)
    act = _act(rows) if quantized else None
    got, want = layer_moment(rows, act), row_moments(jnp.asarray(rows), act)
    assert isinstance(got, Moments)
    np.testing.assert_allclose(np.asarray(got.h_hat), np.asarray(want.h_hat), rtol=2e-5, atol=1e-6)


def test_layer_moment_keeps_the_factor_of_wide_rows():
    rows = np.random.default_rng(0).normal(size=(40, 1, 64)).astype(np.float32)
    got = layer_moment(rows, None)
    assert isinstance(got, RowFactor)
    np.testing.assert_allclose(np.asarray(got.r), np.asarray(row_moments(jnp.asarray(rows), None).r), rtol=1e-6)


def test_layer_moment_compiles_one_chunk_program_for_any_row_count():
    rows = np.random.default_rng(1).normal(size=(4 * MOMENT_CHUNK, 2, 9)).astype(np.float32)
    layer_moment(rows[: MOMENT_CHUNK + 5], None)
    with jaxq.compile_count() as c:
        layer_moment(rows[: 3 * MOMENT_CHUNK + 11], None)
        layer_moment(rows, None)
    assert c.count == 0


def test_easy_quant_reads_only_the_rows_it_uses_and_float_rows_once():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(ROWS_USED + 300, 1, 16)).astype(np.float32)
    w = rng.normal(size=(8, 16)).astype(np.float32)
    qw = jaxq.quantize_weight(jnp.asarray(w), QScheme(bits=4, signed=True, symmetric=True, axis=0))

    def layer(r, target):
        return LayerRows(r, target, w.reshape(1, 8, 16), None, _act(rows), qw.qparams)

    full = easy_quant_layers({"a": layer(rows, rows)}, 16)["a"]
    cut = easy_quant_layers({"a": layer(rows[:ROWS_USED], rows[:ROWS_USED].copy())}, 16)["a"]
    for x, y in zip(jnp.asarray(full.weight.scale)[None], jnp.asarray(cut.weight.scale)[None]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(full.act.scale), np.asarray(cut.act.scale))
    assert float(full.cosine_after) == pytest.approx(float(cut.cosine_after), rel=1e-6)
