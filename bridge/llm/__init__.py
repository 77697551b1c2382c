"""Decoder language models: layer-by-layer GPTQ / AWQ / round-to-nearest quantization
(`sequential`), activation quantizers (`activations`) and compressed-tensors checkpoints
(`bridge.export.compressed_tensors`)."""

from bridge.llm.sequential import LinearRecord, LlmQuantized, quantize_decoder

__all__ = ["LinearRecord", "LlmQuantized", "quantize_decoder"]
