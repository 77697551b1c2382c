"""Weight-only quantization of checkpoints on disk (`jaxq quantize-weights`): safetensors
read and written by row blocks, never the whole model in memory."""

from bridge.weights_only.quantize import WeightOnlyConfig, dequantize, plan, quantize_checkpoint
from bridge.weights_only.safetensors_io import CheckpointError, open_checkpoint, read_rows

__all__ = [
    "CheckpointError",
    "WeightOnlyConfig",
    "dequantize",
    "open_checkpoint",
    "plan",
    "quantize_checkpoint",
    "read_rows",
]
