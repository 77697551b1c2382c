"""The model as a JAX function (docs/design.md §5b): lowering through torchax, the quantized
forward with `jaxq`'s numerics, the Flax NNX module, and model-level studies.

    lower(module, example)            → LoweredModel: f(params, buffers, args, kwargs)
    quantized_forward(model, records, example, quantizers)
                                      → QuantizedForward: f(params, buffers, state, switches, args, kwargs)
    QuantizedModel(qf)                → Flax NNX module (needs flax)
    isolated_sensitivity(qf, batches) → {layer: distance}, one compiled program
    observe.observe_inputs(...)       → observer states, data-parallel over a mesh (Calibrator(mesh=…))
    block_reconstruction              → BRECQ / QDrop block by block (keep_acc 'brecq' / 'qdrop')

`Calibrator.jax_forward()` / `jax_model()` / `sensitivity(engine="jax")` are the facade.
"""

from bridge.jax_model.compat import JaxModelUnavailableError, torchax_env
from bridge.jax_model.lower import LoweredModel, LoweringError, lower
from bridge.jax_model.quantized import JaxLayer, QuantizedForward, quantized_forward
from bridge.jax_model.studies import isolated_sensitivity

__all__ = [
    "JaxLayer",
    "JaxModelUnavailableError",
    "LoweredModel",
    "LoweringError",
    "QuantizedForward",
    "isolated_sensitivity",
    "lower",
    "quantized_forward",
    "torchax_env",
]
