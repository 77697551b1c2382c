"""`keep_acc={"pd_quant": …}`: every input step size learned on the whole model's output."""

import numpy as np
import pytest
import torch

import jaxq
from bridge import Calibrator, load_quantized
from bridge.models.digits import load_digits_cnn

W4A4 = dict(w_bit=4, a_bit=4, quantize_first_last="8bit", act_method=2)


@pytest.fixture(scope="module")
def calib(digits):
    x_train = digits[0]
    return [x_train[i : i + 32] for i in range(0, 128, 32)]


def _kl_to_float(model, batches) -> float:
    fp = load_digits_cnn()
    with torch.no_grad():
        x = torch.cat(batches)
        ref, q = torch.log_softmax(fp(x), -1), torch.log_softmax(model(x), -1)
    return float((ref.exp() * (ref - q)).sum(-1).mean())


def _cal(calib, steps=200, **kw):
    ka = {"pd_quant": [True, steps]} if steps else None
    cfg = jaxq.QuantConfig(**W4A4, keep_acc=ka, **kw)
    return Calibrator(load_digits_cnn(), cfg, calib, progress=False).run()


def test_learned_step_sizes_lower_the_output_distance_and_are_what_the_model_runs(calib, tmp_path):
    rtn, cal = _cal(calib, steps=0), _cal(calib)
    report = cal.reports["pd_quant"]["model"]
    assert report.kept and report.fitted_after < 0.8 * report.fitted_before
    assert report.samples == 128 and report.held_samples == 0
    changed = 0
    for name, factor in report.scales.items():
        before, after = rtn.records[name].input_scale, cal.records[name].input_scale
        np.testing.assert_allclose(after, np.float32(before) * np.float32(factor), rtol=1e-6)
        q = cal.quantizers[name]
        np.testing.assert_array_equal(q.input_scale.detach().numpy().reshape(-1), np.reshape(after, -1))
        changed += factor != 1.0
    assert changed == len(report.scales) >= 3
    # the torch model, run as calibrated, is as close to float as the JAX program measured
    assert _kl_to_float(cal.model, calib) < 0.8 * _kl_to_float(rtn.model, calib)
    cal.export_param(tmp_path / "p")
    reloaded = load_quantized(load_digits_cnn(), tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(reloaded(calib[0]), cal.model(calib[0]))


def test_a_held_out_split_is_never_fitted_and_decides(calib):
    cal = _cal(calib, recon_holdout=0.25)
    report = cal.reports["pd_quant"]["model"]
    assert report.held_samples == 32  # one of the four batches' worth of images, none of them fitted
    assert np.isfinite(report.held_before) and np.isfinite(report.held_after)
    assert report.kept == (report.held_after < report.held_before)


def test_step_sizes_that_do_not_lower_the_distance_are_not_kept(calib):
    rtn = _cal(calib, steps=0)
    cfg = jaxq.QuantConfig(**W4A4, keep_acc=jaxq.KeepAcc(pd_quant=jaxq.keep_acc.PdQuant(steps=3, lr=0.0)))
    cal = Calibrator(load_digits_cnn(), cfg, calib, progress=False).run()
    assert not cal.reports["pd_quant"]["model"].kept
    for name, rec in cal.records.items():
        np.testing.assert_array_equal(rec.input_scale, rtn.records[name].input_scale)


_TWICE = """
import jaxq
from bridge import Calibrator
from bridge.models.digits import digits_split, load_digits_cnn
x = digits_split()[0]
calib = [x[i : i + 32] for i in range(0, 128, 32)]
cfg = jaxq.QuantConfig(w_bit=4, a_bit=4, quantize_first_last="8bit", keep_acc={"pd_quant": [True, 20]})
for run in range(2):
    with jaxq.compile_count() as c:
        cal = Calibrator(load_digits_cnn(), cfg, calib, progress=False).run()
    print("compiles", run, cal.reports["pd_quant"]["model"].compilations, c.count)
"""


@pytest.mark.slow
def test_a_second_run_compiles_nothing(tmp_path):
    """In a fresh process with jaxq's compilation cache (the default for users) the step's
    program, and the whole second calibration, compile nothing."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAXQ_COMPILATION_CACHE": str(tmp_path / "cache")}
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _TWICE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = [line.split()[2:] for line in out.stdout.splitlines() if line.startswith("compiles")]
    assert int(counts[0][0]) >= 1, counts
    assert counts[1] == ["0", "0"], counts


def test_the_config_refuses_pd_quant_without_quantized_inputs():
    with pytest.raises(ValueError, match="pd_quant.*act_quant=True"):
        jaxq.QuantConfig(act_quant=False, keep_acc={"pd_quant": [True, 10]})


def test_over_the_memory_budget_the_gradient_is_taken_in_parts_with_the_same_result(calib, monkeypatch):
    import bridge.pipeline

    whole = _cal(calib, steps=20).reports["pd_quant"]["model"]
    monkeypatch.setattr(bridge.pipeline, "block_program_bytes", lambda budget: 1)
    parts = _cal(calib, steps=20).reports["pd_quant"]["model"]
    assert (whole.micro_batch, parts.micro_batch) == (8, 1)
    assert whole.working_mib > parts.working_mib
    for name, factor in whole.scales.items():
        np.testing.assert_allclose(parts.scales[name], factor, rtol=1e-4)
