"""SmoothQuant in the JAX model: the quantized forward, data-parallel observers and block
reconstruction divide the input by `s` as the torch quantizer does."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bridge.jax_model.lower import to_jax_tree
from jaxq.model_quant import Switches

from bridge import Calibrator

_spec = importlib.util.spec_from_file_location(
    "bridge_smoothing_tests", __file__.replace("jax_model/test_smoothing.py", "test_smoothing.py")
)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
OutlierBlock, CFG, D = _mod.OutlierBlock, _mod.CFG, _mod.D


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 10, D, generator=g) for _ in range(4)]


def _out(model, x):
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.slow
def test_the_jax_model_computes_the_smoothed_layers():
    calib = _calib()
    m = OutlierBlock()
    cal = Calibrator(m, CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    qf = cal.jax_forward(calib[0])
    assert set(qf.smoothing) == {n for n, r in cal.records.items() if r.smoothing is not None}
    x = calib[1]
    lw = qf.lowered
    run = jax.jit(qf.fn)
    out = np.asarray(run(lw.params, lw.buffers, qf.state, qf.default_switches(), to_jax_tree((x,)), {}))
    off = np.asarray(
        run(
            lw.params,
            lw.buffers,
            qf.state,
            Switches(jnp.zeros(len(qf.layers)), jnp.zeros(len(qf.layers))),
            to_jax_tree((x,)),
            {},
        )
    )
    tq = _out(m, x)
    with cal.quantization(False):
        tf = _out(m, x)
    quant_error = np.abs(tq - tf).mean()
    assert quant_error > 1e-3
    assert np.abs(out - tq).mean() < 0.01 * quant_error  # x/s rounds alike; rare one-step flips at most
    np.testing.assert_allclose(off, tf, rtol=1e-5, atol=1e-5)  # switched off: W·s and x/s cancel


def test_observers_over_a_mesh_see_the_smoothed_input(monkeypatch):
    import bridge.jax_model.observe as observe
    from jaxq.sharding import data_mesh

    seen = []
    real = observe.InputObserver.__init__
    monkeypatch.setattr(
        observe.InputObserver,
        "__init__",
        lambda self, *a, **k: (
            seen.append(dict(a[5] if len(a) > 5 else k.get("smoothing") or {})),
            real(self, *a, **k),
        )[1],
    )
    calib = _calib()
    plain = Calibrator(OutlierBlock(), CFG.replace(smooth_quant=0.5), calib, progress=False).run()
    meshed = Calibrator(OutlierBlock(), CFG.replace(smooth_quant=0.5), calib, progress=False, mesh=data_mesh()).run()
    assert seen and set(seen[0]) == {n for n, r in plain.records.items() if r.smoothing is not None}
    for name, rec in plain.records.items():
        np.testing.assert_allclose(meshed.records[name].input_scale, rec.input_scale, rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_block_reconstruction_keeps_the_factors_and_lowers_the_error():
    calib = _calib()
    m = OutlierBlock()
    cal = Calibrator(
        m, CFG.replace(w_bit=4, smooth_quant=0.5, keep_acc={"qdrop": [True, 20]}), calib, progress=False
    ).run()
    smoothed = [n for n, r in cal.records.items() if r.smoothing is not None]
    assert {"q", "k", "v", "fc1", "fc2"} <= set(smoothed)
    reports = cal.reports["blocks"]
    assert any(r.error_after < r.error_before for r in reports if set(r.layers) & {"q", "fc1", "fc2"})
