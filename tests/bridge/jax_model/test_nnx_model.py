import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bridge.jax_model.lower import to_jax_tree
from bridge.jax_model.nnx_model import QuantizedModel, QuantizerState, QuantScale


def test_nnx_module_equals_the_quantized_forward_and_splits_merges(digits_w8a8):
    cal, p = digits_w8a8
    qf = cal.jax_forward()
    model = cal.jax_model()
    x = p.calib_data[0]
    lw = qf.lowered
    ref = np.asarray(qf.fn(lw.params, lw.buffers, qf.state, qf.default_switches(), to_jax_tree((x,)), {}))
    xj = jnp.asarray(x.numpy())
    out = np.asarray(nnx.jit(lambda m, x: m(x))(model, xj))
    np.testing.assert_array_equal(out, ref)
    graph, state = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(nnx.merge(graph, state)(xj)), ref)
    assert set(nnx.state(model, QuantizerState)["quantizers"]) == set(qf.names)


def test_optax_fine_tune_of_weights_and_scales_lowers_the_loss(digits_w8a8):
    cal, p = digits_w8a8
    model = cal.jax_model()
    x, y = p.calib_data[0], None
    xj = jnp.asarray(x.numpy())
    y = jnp.argmax(model(xj), -1)  # self-distillation target: the loss must fall
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Any(nnx.Param, QuantScale))

    @nnx.jit
    def step(m, opt):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xj) * 0.2, y).mean()

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, QuantScale)))(m)
        opt.update(m, grads)
        return value

    first = float(step(model, opt))
    for _ in range(5):
        last = float(step(model, opt))
    assert last < first
    offsets = [
        float(v[...].sum()) for name in model.layer_names for f, v in model.quantizers[name].items() if f == "w_offset"
    ]
    assert all(o == 0.0 for o in offsets)  # symmetric weights: offsets untouched by training scales
    assert isinstance(QuantizedModel, type)
