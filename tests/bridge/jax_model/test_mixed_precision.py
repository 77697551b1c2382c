import numpy as np
import pytest

import jaxq
from bridge import Calibrator
from bridge.jax_model.mixed_precision import mixed_precision_front


@pytest.fixture(scope="module")
def front(digits_w8a8):
    cal, _ = digits_w8a8
    return mixed_precision_front(cal.jax_forward(), cal.calibration_batches(32), bits=(4, 6, 8))


def test_front_is_reproducible_and_compiles_once(digits_w8a8, front):
    cal, _ = digits_w8a8
    with jaxq.compile_count() as c:
        again = mixed_precision_front(cal.jax_forward(), cal.calibration_batches(32), bits=(4, 6, 8))
    assert c.count == 0
    np.testing.assert_array_equal(again.distance, front.distance)
    assert again.allocations == front.allocations


def test_front_orders_size_and_distance_and_allocations_fit(front):
    sizes, dist = front.avg_bits[front.front], front.distance[front.front]
    assert np.all(np.diff(sizes) > 0) and np.all(np.diff(dist) < 0)
    uniform = {label: i for i, label in enumerate(front.labels) if label.startswith("uniform")}
    assert front.distance[uniform["uniform W4"]] > front.distance[uniform["uniform W8"]]
    for i, label in enumerate(front.labels):
        if label.startswith("budget"):
            assert front.avg_bits[i] <= float(label.split()[1]) + 0.005
    six = front.allocation(6.0)
    assert front.distance[front.allocations.index(six)] <= front.distance[uniform["uniform W6"]]
    assert str(front).splitlines()[0].strip().startswith("bits/weight")


def test_the_allocation_calibrates_through_layer_bits(digits_w8a8, front):
    cal, p = digits_w8a8
    bits = front.layer_bits(5.0)
    assert set(bits.values()) <= {4, 6, 8} and bits
    mixed = Calibrator(
        p.make_model(), jaxq.QuantConfig(w_bit=8, a_bit=8, layer_bits=bits), p.calib_data, progress=False
    ).run()
    assert {n: q.weight_scheme.bits for n, q in mixed.quantizers.items()} == bits
    with pytest.raises(ValueError, match="no measured allocation fits"):
        front.allocation(3.0)


def test_front_takes_calib_data_style_batches(digits_w8a8, front):
    cal, _ = digits_w8a8
    tensors = [b.args[0] for b in cal.calibration_batches(32)]  # a list of tensors, as calib_data
    again = mixed_precision_front(cal.jax_forward(), tensors, bits=(4, 6, 8))
    np.testing.assert_array_equal(again.distance, front.distance)
    with pytest.raises(ValueError, match="batches is empty"):
        mixed_precision_front(cal.jax_forward(), [], bits=(4, 6, 8))


def test_each_width_takes_the_weight_range_calibration_would(digits_w8a8):
    """4-bit costs are measured on the searched range (`w_range` None resolves to "mse" at
    4 bits), 8-bit on min-max, as `QuantConfig(layer_bits=…)` will calibrate them."""
    from bridge.jax_model.mixed_precision import _tables
    from jaxq.calibrate import quantize_weight

    cal, _ = digits_w8a8
    qf = cal.jax_forward()
    default, minmax = _tables(qf, (4, 8)), _tables(qf, (4, 8), "minmax")
    differs = False
    for layer in qf.layers:
        w, scheme = qf.float_weights[layer.weight_key], qf.weight_scheme[layer.name]
        for i, (bits, rng) in enumerate(((4, "mse"), (8, "minmax"))):
            s = jaxq.QScheme(bits=bits, signed=scheme.signed, symmetric=scheme.symmetric, axis=0)
            expected = quantize_weight(w, s, rng).qparams
            np.testing.assert_allclose(np.asarray(default[layer.name][0][i]), np.asarray(expected.scale), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(default[layer.name][0][1]), np.asarray(minmax[layer.name][0][1]))
        differs |= not np.array_equal(np.asarray(default[layer.name][0][0]), np.asarray(minmax[layer.name][0][0]))
    assert differs
