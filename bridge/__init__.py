"""bridge: everything that touches PyTorch — capture, fusion, fake-quant modules, export."""

from bridge import jit_cache
from bridge.calibrator import Calibrator
from bridge.inplace.prepare import EmptyModelError
from bridge.capture.data import CalibrationDataError
from bridge.devices import DeviceUnavailableError, resolve_device
from bridge.export import ExportError
from bridge.inplace.fakequant import LayerQuantizer
from bridge.capture.activations import NonFiniteActivationError
from bridge.inplace.modules import LayerNameError
from bridge.export.reload import ParamFileError, load_quantized, restore_model
from bridge.inplace.transaction import QuantizedModelError
from bridge.export.w8a8 import W8A8Error

jit_cache.enable()  # JAX's persistent compilation cache (bridge/jit_cache.py; JAXQ_COMPILATION_CACHE=off)

__all__ = [
    "CalibrationDataError",
    "Calibrator",
    "DeviceUnavailableError",
    "EmptyModelError",
    "ExportError",
    "LayerNameError",
    "LayerQuantizer",
    "NonFiniteActivationError",
    "ParamFileError",
    "QuantizedModelError",
    "W8A8Error",
    "load_quantized",
    "resolve_device",
    "restore_model",
]
