"""The torch runner: our own low-memory engine (Llama/Qwen2 from GGUF, paged quantized KV)."""

from .engine import TorchEngine

__all__ = ["TorchEngine"]
