"""bridge: everything that touches PyTorch — capture, fusion, fake-quant modules, export."""
from bridge import jit_cache
from bridge.calibrator import Calibrator
from bridge.prepare import EmptyModelError
from bridge.data import CalibrationDataError
from bridge.devices import DeviceUnavailableError, resolve_device
from bridge.export import ExportError
from bridge.fakequant import LayerQuantizer, QuantWrapper
from bridge.capture import NonFiniteActivationError
from bridge.modules import LayerNameError
from bridge.reload import ParamFileError, load_quantized, restore_model
from bridge.transaction import QuantizedModelError
from bridge.export.w8a8 import W8A8Error

jit_cache.enable()  # JAX's persistent compilation cache (bridge/jit_cache.py; JAXQ_COMPILATION_CACHE=off)

__all__ = [
    "CalibrationDataError", "Calibrator", "DeviceUnavailableError", "EmptyModelError", "ExportError",
    "LayerNameError", "LayerQuantizer", "NonFiniteActivationError", "ParamFileError", "QuantWrapper",
    "QuantizedModelError", "W8A8Error", "load_quantized", "resolve_device", "restore_model",
]


def __getattr__(name: str):
    """`bridge.protocols`, `bridge.zoo`, `bridge.metrics`: the evaluation harness's former place."""
    if name in ("protocols", "zoo", "metrics"):
        import importlib

        return importlib.import_module(f"bridge.evaluation.{name}")
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
