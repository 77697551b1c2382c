"""Row capture for EasyQuant, AdaRound and bias correction: torch gathers agree with
`jaxq.rows`, exact mean rows, stratified sampling, the geometry check."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import jaxq
import jaxq.host
from bridge import Calibrator
from bridge.capture.row_capture import LayerGeometryError, RowCapture, row_sum, window_rows
from jaxq.rows import output_positions, take_rows
from tests.bridge.test_accuracy_keeping import DynamicPadConv
from tests.jaxq.test_rows import SPECS

CONVS = [s for s in SPECS if s[0].kind != "linear"]


@pytest.mark.parametrize("spec,x_shape,w_shape", CONVS, ids=[s[0].name for s in CONVS])
def test_window_rows_equal_take_rows_bit_for_bit(spec, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    n = int(np.prod(output_positions(spec, x_shape)))
    index = np.sort(rng.choice(n, size=min(n, 23), replace=False)).astype(np.int32)
    expected = np.asarray(take_rows(spec, jnp.asarray(x), jnp.asarray(index)))
    np.testing.assert_array_equal(window_rows(spec, torch.from_numpy(x), index), expected)


@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS, ids=[s[0].name for s in SPECS])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_row_sum_is_the_sum_of_every_row(spec, x_shape, w_shape, seed):
    x = np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)
    n = int(np.prod(output_positions(spec, x_shape)))
    every = np.asarray(take_rows(spec, jnp.asarray(x), jnp.arange(n, dtype=jnp.int32)), np.float64)
    total, count = row_sum(spec, torch.from_numpy(x))
    assert count == n
    # the batch is summed in float32: within a few float32 roundings of Σ|row|
    assert np.all(np.abs(total - every.sum(0)) <= 1e-6 * np.abs(every).sum(0) + 1e-12)


def _capture(model, data, **kw):
    layers = {"0": model[0]}
    spec = {"0": jaxq.LayerSpec("0", "conv2d", (1, 1), ((1, 1), (1, 1)), (1, 1), 1, True, (3, 3))}
    with RowCapture(layers, spec, rows=100, seed=0, **kw) as cap, torch.no_grad():
        for x in data:
            model(x)
    return cap


def test_rows_are_stratified_over_known_batches_and_the_mean_is_exact():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    data = [torch.randn(2, 2, 6, 6) for _ in range(4)]
    cap = _capture(model, data, batches=len(data))
    assert [p.shape[0] for p in cap._parts["0"]] == [25] * 4  # ⌈100 / 4⌉ per batch
    rows = cap.result()["0"]
    assert rows.shape == (100, 1, 18)
    assert rows.ctypes.data % jaxq.host.ALIGNMENT == 0  # the compiled steps read it without a copy
    x = torch.cat(data)
    cols = nn.functional.unfold(x, 3, padding=1)  # [N, C·9, positions]
    np.testing.assert_allclose(cap.mean_rows()["0"][0], cols.double().mean((0, 2)).numpy(), rtol=1e-5, atol=1e-6)
    assert [p.shape[0] for p in _capture(model, data)._parts["0"]] == [72] * 4  # unknown count: rows per batch, capped


def test_mean_rows_alone_keep_no_rows():
    cap = _capture(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)), [torch.randn(2, 2, 6, 6)], keep_rows=False)
    assert cap._parts["0"] == [] and cap.mean_rows()["0"].shape == (1, 18)
    with pytest.raises(RuntimeError, match="keep_rows=False"):
        cap.result()


def test_bias_correction_alone_still_checks_the_geometry():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), DynamicPadConv(4, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(3)
    )
    data = [torch.randn(4, 1, 12, 12) for _ in range(2)]
    model(data[0])
    cfg = jaxq.QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, bias_correction=True)
    with pytest.raises(LayerGeometryError, match=r"'2'"):
        Calibrator(copy.deepcopy(model), cfg, data, progress=False).run()


def test_mean_rows_summed_once_equal_the_per_batch_sums_bit_for_bit():
    """Batch sums of equal shape add up before the window sum (linear), per input shape:
    the mean rows are those of summing every batch's rows (`row_sum`) one by one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2))
    data = [torch.randn(3, 2, 9, 9), torch.randn(2, 2, 9, 9), torch.randn(3, 2, 7, 7), torch.randn(1, 2, 9, 9)]
    spec = {"0": jaxq.LayerSpec("0", "conv2d", (2, 2), ((1, 1), (1, 1)), (1, 1), 1, True, (3, 3))}
    with RowCapture({"0": model[0]}, spec, rows=10, seed=0, keep_rows=False) as cap, torch.no_grad():
        for x in data:
            model(x)
    parts = [row_sum(spec["0"], x) for x in data]
    expected = (sum(t for t, _ in parts) / sum(n for _, n in parts)).astype(np.float32)
    np.testing.assert_array_equal(cap.mean_rows()["0"], expected)
    assert set(cap._sums["0"]) == {(2, 9, 9), (2, 7, 7)}


class ShiftedPadConv(nn.Conv2d):
    """Declares padding 1 but pads (0, 2) at run time: as many outputs as the spec says,
    each from a window shifted by one pixel."""

    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (0, 2, 0, 2)), self.weight, self.bias, self.stride)


def test_the_mean_row_check_finds_a_shifted_window_with_the_right_output_size():
    torch.manual_seed(0)
    shifted = ShiftedPadConv(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), shifted, nn.Flatten(), nn.LazyLinear(3))
    data = [torch.randn(4, 1, 12, 12) + torch.linspace(0, 3, 12) for _ in range(2)]  # borders differ from the middle
    model(data[0])
    cfg = jaxq.QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, bias_correction=True)
    with pytest.raises(LayerGeometryError, match=r"'2' \(ShiftedPadConv\).*mean output differs"):
        Calibrator(copy.deepcopy(model), cfg, data, progress=False).run()


def test_the_mean_row_check_passes_linear_layers_on_sequences():
    """A linear layer's output positions are every leading index (`[B, L, out]`), not the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    cfg = jaxq.QuantConfig(quant_mode=1, act_method=1, quantize_first_last=True, bias_correction=True)
    cal = Calibrator(model, cfg, data, progress=False).run()
    assert set(cal.reports["bias_correction"]) == {"0", "2"}
