import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxq
from bridge import Calibrator
from bridge.inplace.fakequant import fake_quant_per_tensor_cpu
from bridge.jax_model import LoweringError
from bridge.jax_model.lower import to_jax_tree
from jaxq.model_quant import Switches, grid


def _run(qf, x, switches=None, state=None):
    lw = qf.lowered
    sw = switches if switches is not None else qf.default_switches()
    return np.asarray(jax.jit(qf.fn)(lw.params, lw.buffers, state or qf.state, sw, to_jax_tree((x,)), {}))


def test_first_quantizer_codes_equal_torch_and_outputs_match_relative_to_quant_error(digits_w8a8):
    cal, p = digits_w8a8
    x = p.calib_data[1]
    qf = cal.jax_forward()
    first = qf.layers[0]
    q = cal.quantizers[first.name]
    s = qf.state[first.name]
    xj = jnp.asarray(x.numpy())
    mine = np.asarray(jaxq.model_quant.quantized_input(xj, s, 1.0))
    torch_side = fake_quant_per_tensor_cpu(x.float(), *q._input_qparams, q.act_scheme.qmin, q.act_scheme.qmax).numpy()
    np.testing.assert_array_equal(mine, torch_side)
    out = _run(qf, x)
    with torch.no_grad():
        tq = cal.model(x).numpy()
        with cal.quantization(False):
            tf = cal.model(x).numpy()
    quant_error = np.abs(tq - tf).mean()
    assert quant_error > 1e-3
    assert np.abs(out - tq).mean() < 0.01 * quant_error


def test_switches_off_is_the_float_model_and_weight_only_switch_works(digits_w8a8):
    cal, p = digits_w8a8
    x = p.calib_data[0]
    qf = cal.jax_forward()
    n = len(qf.layers)
    off = Switches(jnp.zeros(n), jnp.zeros(n))
    with torch.no_grad(), cal.quantization(False):
        tf = cal.model(x).numpy()
    np.testing.assert_allclose(_run(qf, x, off), tf, atol=1e-5)
    weights_only = Switches(jnp.ones(n), jnp.zeros(n))
    assert not np.allclose(_run(qf, x, weights_only), tf, atol=1e-5)


def test_bit_widths_are_arguments_no_recompile(digits_w8a8):
    cal, p = digits_w8a8
    x = p.calib_data[0]
    qf = cal.jax_forward()
    f = jax.jit(qf.fn)
    lw, sw = qf.lowered, qf.default_switches()
    args = to_jax_tree((x,))
    f(lw.params, lw.buffers, qf.state, sw, args, {}).block_until_ready()
    lo, hi = grid(4)
    w4 = {}
    for name, s in qf.state.items():
        w = lw.params[next(layer.weight_key for layer in qf.layers if layer.name == name)]
        scale, offset, qmin, qmax = jaxq.model_quant.weight_qparams_for_bits(w, cal.cfg.weight_scheme, 4)
        w4[name] = s._replace(w_scale=scale, w_offset=offset, w_qmin=qmin, w_qmax=qmax)
    assert float(lo) == -8 and float(hi) == 7
    with jaxq.compile_count() as c:
        out4 = np.asarray(f(lw.params, lw.buffers, w4, sw, args, {}))
    assert c.count == 0
    out8 = np.asarray(f(lw.params, lw.buffers, qf.state, sw, args, {}))
    assert np.abs(out4 - out8).mean() > 0


def test_straight_through_gradients_reach_weights_and_scales(digits_w8a8):
    cal, p = digits_w8a8
    qf = cal.jax_forward()
    lw = qf.lowered
    xj = to_jax_tree((p.calib_data[0],))
    loss = lambda params, state: jnp.sum(qf.fn(params, lw.buffers, state, qf.default_switches(), xj, {}) ** 2)
    gp, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(lw.params, qf.state)
    first = qf.layers[0]
    assert float(jnp.abs(gp[first.weight_key]).sum()) > 0
    assert float(jnp.abs(gs[first.name].w_scale).sum()) > 0 and float(jnp.abs(gs[first.name].a_scale)) > 0


@pytest.mark.slow
def test_chosen_codes_and_bias_correction_match_torch():
    from bridge.evaluation import protocols

    p = protocols.digits()
    cfg = jaxq.QuantConfig(
        w_bit=4,
        quant_mode=1,
        act_method=1,
        quantize_first_last=True,
        bias_correction=True,
        keep_acc={"round_opt": True},
    )
    cal = Calibrator(p.make_model(), cfg, p.calib_data, progress=False).run()
    assert any(r.custom_codes for r in cal.records.values()) and any(
        r.bias_correction is not None for r in cal.records.values()
    )
    x = p.calib_data[2]
    out = _run(cal.jax_forward(), x)
    with torch.no_grad():
        tq = cal.model(x).numpy()
        with cal.quantization(False):
            tf = cal.model(x).numpy()
    assert np.abs(out - tq).mean() < 0.01 * np.abs(tq - tf).mean()


def test_functional_layers_are_refused_with_a_clear_error():
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    data = [torch.randn(2, 5, 8) for _ in range(2)]
    cal = Calibrator(
        Attn().eval(), jaxq.QuantConfig(w_bit=8, a_bit=8, quantize_first_last=True), data, progress=False
    ).run()
    with pytest.raises(LoweringError, match="used functionally"):
        cal.jax_forward()
    cal.model(data[0])  # the torch path still runs


def test_a_calibrated_model_that_cannot_lower_says_why_and_stays_usable(data_dependent_model):
    torch.manual_seed(0)
    data = [torch.randn(4, 4) for _ in range(3)]
    cal = Calibrator(
        data_dependent_model, jaxq.QuantConfig(w_bit=8, a_bit=8, quantize_first_last=True), data, progress=False
    ).run()
    with pytest.raises(LoweringError, match="DataDependent cannot run as a JAX function"):
        cal.sensitivity(metrics=("isolated",), engine="jax")
    table = cal.sensitivity(metrics=("isolated",))  # the torch path
    assert table.ranked("isolated") == ["fc"]
    with pytest.raises(ValueError, match="engine='cuda'"):
        cal.sensitivity(engine="cuda")
