"""Former location of `bridge.export.onnx` (kept so existing imports work)."""
from bridge.export.onnx import export_qdq, fold_weight_quantizers, onnx_session  # noqa: F401
