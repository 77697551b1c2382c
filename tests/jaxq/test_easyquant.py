import numpy as np
import pytest
import jax.numpy as jnp

import jaxq
import jaxq.rows
from jaxq import LayerSpec, QScheme
from jaxq.easyquant import (
    ACT_SEARCH_FLOATS,
    act_row_chunk,
    easy_quant,
    easy_quant_bucket,
    layer_cosine,
    search_act_scale,
)
from jaxq.rows import grouped_weight

ACT = QScheme(8, False, False, None)
W4 = QScheme(4, True, True, 0)


def _layer(seed=0, out=12, d=24, m=256):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, d)) * np.exp(rng.standard_normal(d))).astype(np.float32)
    x[: max(m // 64, 1)] *= 8  # a few outlier rows: min-max ranges are too wide
    w = (rng.standard_t(3, (out, d)) * 0.2).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)


def _fq(a, scale, offset, scheme, axis=None):
    """NumPy fake-quant with torch's `x · (1/s)` rounding."""
    a = np.asarray(a, np.float32)
    inv = np.float32(1) / np.asarray(scale, np.float32)
    off = np.asarray(offset, np.float32)
    if axis is not None:
        inv, off, scale = inv[:, None], off[:, None], np.asarray(scale)[:, None]
    q = np.clip(np.round(a * inv) + off, scheme.qmin, scheme.qmax)
    return ((q - off) * scale).astype(np.float32)


def _cos(a, b, axis=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis) / np.sqrt(np.sum(a * a, axis) * np.sum(b * b, axis))


def numpy_easy_quant(x_q, x, w, b, act, weight, n, rounds=2):
    """Loop reference: alternate a grid search of the activation scale (layer cosine) and of
    every channel's weight scale (channel cosine); `x_q` feeds the quantized layer."""
    y = x @ w.T + b
    a_s, a_o = float(act.scale), int(act.offset)
    w_s, w_o = np.asarray(weight.scale).copy(), np.asarray(weight.offset)
    grid = np.linspace(0.5, 2.0, n, dtype=np.float32)
    for _ in range(rounds):
        w_hat = _fq(w, w_s, w_o, W4, 0)
        score = lambda f: _cos(y, _fq(x_q, np.float32(a_s * f), a_o, ACT) @ w_hat.T + b)  # noqa: E731
        scores = [score(f) for f in grid]
        if max(scores) > score(np.float32(1)):
            a_s = np.float32(a_s * grid[int(np.argmax(scores))])
        x_hat = _fq(x_q, a_s, a_o, ACT)
        for c in range(w.shape[0]):
            sc = lambda f: _cos(
                y[:, c], x_hat @ _fq(w[c : c + 1], np.float32([w_s[c] * f]), w_o[c : c + 1], W4, 0)[0] + b[c]
            )  # noqa: E731
            scores = [sc(f) for f in grid]
            if max(scores) > sc(np.float32(1)):
                w_s[c] = np.float32(w_s[c] * grid[int(np.argmax(scores))])
    return a_s, w_s


@pytest.mark.parametrize("m", [256, 16], ids=["moments", "rows"])  # d=24 ≤ m: moments; d > m: per-candidate rows
def test_matches_numpy_reference_and_improves_layer_cosine(m):
    x, w, b = _layer(m=m)
    act = jaxq.qparams_from_range(x.min(), x.max(), ACT)
    weight = jaxq.quantize_weight(w, W4).qparams
    x_q = x * 1.02 + 0.01  # the quantized model's input drifts from the float one
    spec = LayerSpec("l", "linear", has_bias=True)
    res = easy_quant(x_q[:, None, :], x[:, None, :], grouped_weight(spec, w), b, act, weight, 21)
    a_ref, w_ref = numpy_easy_quant(np.asarray(x_q), np.asarray(x), np.asarray(w), np.asarray(b), act, weight, 21)
    np.testing.assert_allclose(float(res.act.scale), a_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.weight.scale), w_ref, rtol=1e-5)
    assert float(res.cosine_after) > float(res.cosine_before)


def test_weight_only_searches_weights_only():
    x, w, b = _layer(1)
    spec = LayerSpec("l", "linear", has_bias=True)
    weight = jaxq.quantize_weight(w, W4).qparams
    res = easy_quant(x[:, None, :], x[:, None, :], grouped_weight(spec, w), b, None, weight, 11)
    assert res.act is None
    assert float(res.cosine_after) >= float(res.cosine_before)


def _two_halves(held_scale):
    """1024 rows: the search fits the first 512; the next 512 are held out, `held_scale`× larger."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1024, 24)).astype(np.float32)
    x[[0, 1, 512, 513]] *= 6  # a few outlier rows in each half
    x[512:] *= held_scale
    w = (rng.standard_t(3, (12, 24)) * 0.2).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(rng.standard_normal(12).astype(np.float32))


@pytest.mark.parametrize("held_scale, kept", [(1.0, False), (4.0, True)])
def test_scales_that_do_not_help_held_out_rows_are_not_taken(held_scale, kept):
    x, w, b = _two_halves(held_scale)
    act = jaxq.qparams_from_range(x.min(), x.max(), ACT)
    weight = jaxq.quantize_weight(w, W4).qparams
    spec = LayerSpec("l", "linear", has_bias=True)
    res = easy_quant(x[:, None, :], x[:, None, :], grouped_weight(spec, w), b, act, weight, 21)
    # equal halves: the fitted scales generalise and are taken; a 4× larger held-out half
    # is clipped by the activation scale fitted to the first: the layer keeps its scales
    assert (float(res.act.scale) == float(act.scale)) == kept
    assert np.array_equal(np.asarray(res.weight.scale), np.asarray(weight.scale)) == kept


@pytest.mark.parametrize("row_chunk", [1, 7, 64])
def test_activation_search_in_row_chunks_picks_the_scale_of_one_pass(row_chunk):
    """Chunks of any size (7 does not divide the rows: the padded tail is masked) give the
    scale the whole rows give."""
    x, w, b = _layer(seed=3, m=200)
    rows = x[:, None, :]
    act = jaxq.qparams_from_range(x.min(), x.max(), ACT)
    wg = grouped_weight(LayerSpec("l", "linear", has_bias=True), w)
    y = jaxq.rows.rows_forward(wg, b, rows)
    whole = search_act_scale(rows, y, wg, b, act, 21)
    chunked = search_act_scale(rows, y, wg, b, act, 21, row_chunk)
    assert float(whole.scale) != float(act.scale)  # the search moves the scale here
    assert float(chunked.scale) == float(whole.scale)


def test_easy_quant_of_a_wide_depthwise_bucket_holds_a_bounded_working_set():
    """XLA's temporaries for a bucket of two 5×5 depthwise layers with 672 channels (rows
    beyond `ROW_STEP_FLOATS`: layer cosines summed in steps, rows read in place): 1.6× their
    rows (2.6× with every cosine over all simulated rows at once; 8 candidates' simulated
    rows at a time took 4.6×)."""
    layers, m, g, d = 2, 1024, 672, 25
    rows = jnp.ones((layers, m, g, d))
    wg, b = jnp.ones((layers, g, 1, d)), jnp.zeros((layers, g))
    act = jaxq.QParams(jnp.ones((layers,)), jnp.zeros((layers,), jnp.int32), ACT)
    weight = jaxq.QParams(jnp.ones((layers, g)), jnp.zeros((layers, g), jnp.int32), W4)
    compiled = easy_quant_bucket.lower(rows, None, wg, b, act, weight, candidates=100).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 1.8 * rows.nbytes


def test_act_row_chunk_bounds_rows_and_outputs_of_every_candidate():
    chunk = act_row_chunk(layers=3, rows=512, row_floats=112 + 672, candidates=100)
    assert 1 <= chunk <= 512 and 3 * 101 * chunk * (112 + 672) <= ACT_SEARCH_FLOATS
    assert act_row_chunk(1, 16, 8, 10) == 16  # small layers: every row in one step


@pytest.mark.parametrize("m, chunk, first", [(37, 8, 3), (32, 8, 0), (5, 45, 1)], ids=["ragged", "even", "one-step"])
def test_layer_cosine_summed_in_steps_equals_one_pass(m, chunk, first):
    """Steps that do not divide the rows are shifted back and masked: every row counts once."""
    rng = np.random.default_rng(m * 100 + chunk)
    rows = jnp.asarray(rng.normal(size=(first + m, 3, 4)).astype(np.float32))
    wg = jnp.asarray(rng.normal(size=(3, 2, 4)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(6,)).astype(np.float32))
    act = jaxq.qparams_from_range(rows.min(), rows.max(), ACT)
    weight = jaxq.quantize_weight(jnp.reshape(wg, (6, 4)), W4).qparams
    y = jaxq.rows.rows_forward(wg, b, rows[first:] * 1.1)
    whole = layer_cosine(rows[first:], y, wg, b, act, weight)
    np.testing.assert_allclose(layer_cosine(rows, y, wg, b, act, weight, chunk, first), whole, rtol=1e-5)
