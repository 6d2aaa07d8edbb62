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
    k_bits: int = 16,
    v_bits: int = 16,
    expert_budget: str | None = None,
    trace_routing: str | None = None,
    expert_prefetch: bool = False,
    expert_policy: str = "freq",
    attn_budget: str | None = None,
    sparse_prefill: bool = False,
    kv_budget: str | None = None,
    kv_dir: Path | None = None,
    ram_budget: int | None = None,
) -> Engine:
    """Load `path` with the named backend; the caller resolved the model (catalog.resolve_model).
    `ram_budget`: what the governor's budget leaves the engine; the torch runner takes the KV
    and expert budgets not named from it (llama.cpp maps its weights and holds its KV whole)."""
    if backend == "llama":
        from .llamacpp import LlamaCppEngine

        if attn_budget or kv_budget:
            raise EngineError(
                "an attention or KV budget needs --engine torch (llama.cpp attends to every "
                "token, from RAM)"
            )
        if expert_budget or trace_routing:
            raise EngineError(
                "an expert budget or a routing trace needs --engine torch (llama.cpp leaves "
                "experts to the page cache)"
            )
        return LlamaCppEngine(path, name, context_length, threads, type_k, type_v)
    if backend == "torch":
        from .torch import TorchEngine

        return TorchEngine(path, name, context_length, threads, k_bits=k_bits, v_bits=v_bits,
                           expert_budget=expert_budget or None,
                           expert_prefetch=expert_prefetch, expert_policy=expert_policy,
                           attn_budget=attn_budget or None, sparse_prefill=sparse_prefill,
                           kv_budget=kv_budget or None, kv_dir=kv_dir,
                           trace_routing=trace_routing or None,
                           ram_budget=ram_budget)  # fmt: skip
    raise EngineError(f"unknown engine {backend!r}; choose llama or torch")
