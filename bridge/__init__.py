"""bridge: everything that touches PyTorch — capture, fusion, fake-quant modules, export."""
from bridge.calibrator import Calibrator, EmptyModelError
from bridge.data import CalibrationDataError
from bridge.devices import DeviceUnavailableError, resolve_device
from bridge.export import ExportError
from bridge.fakequant import QuantWrapper
from bridge.capture import NonFiniteActivationError
from bridge.modules import LayerNameError
from bridge.reload import load_quantized
from bridge.w8a8 import W8A8Error

__all__ = [
    "CalibrationDataError", "Calibrator", "DeviceUnavailableError", "EmptyModelError", "ExportError",
    "LayerNameError", "NonFiniteActivationError", "QuantWrapper", "W8A8Error", "load_quantized", "resolve_device",
]
