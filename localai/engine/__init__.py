"""Engines: one interface (base.Engine), several backends chosen by name."""

from __future__ import annotations

from pathlib import Path

from .base import (
    ContextOverflowError,
    Delta,
    Done,
    Engine,
    EngineError,
    GenerationStats,
    Message,
    SamplingParams,
    chat,
)

__all__ = [
    "ContextOverflowError",
    "Delta",
    "Done",
    "Engine",
    "EngineError",
    "GenerationStats",
    "Message",
    "SamplingParams",
    "chat",
    "load_engine",
]


def load_engine(
    backend: str,
    path: Path,
    name: str,
    context_length: int,
    threads: int,
    type_k: str = "f16",
    type_v: str = "f16",
) -> Engine:
    """Load `path` with the named backend; the caller resolved the model (catalog.resolve_model)."""
    if backend == "llama":
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine(path, name, context_length, threads, type_k, type_v)
    if backend == "torch":
        raise EngineError(
            "the torch runner is not built yet: use --engine llama (the default). "
            "It is tracked as its own work item and listed under Status in the README."
        )
    raise EngineError(f"unknown engine {backend!r}; choose llama or torch")
