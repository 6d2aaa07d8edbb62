"""Wiring shared by the CLI and (later) the daemon: settings + model name → a loaded engine."""

from __future__ import annotations

from . import plugins
from .catalog import Catalog, ModelSpec, ProgressFactory, load_catalog, resolve_model
from .config import Settings
from .engine import Engine, load_engine
from .governor import Governor


def model_specs() -> dict[str, ModelSpec]:
    """The catalog's models plus those that plugins register (catalog names win)."""
    specs = load_catalog()
    plugins.get().call_each(
        "localai_register_models", register=lambda spec: specs.setdefault(spec.name, spec)
    )
    return specs


def model_spec(name: str) -> ModelSpec | None:
    """The spec of a loaded engine's model (`engine.name`); None for a model loaded from a .gguf
    path, which has no catalog entry."""
    return model_specs().get(name)


def open_catalog(settings: Settings) -> Catalog:
    return Catalog(settings.models_dir, model_specs())


def open_engine(
    settings: Settings,
    model: str | None = None,
    progress: ProgressFactory | None = None,
    log=print,
    governor: Governor | None = None,
) -> Engine:
    """Resolve (pulling if needed) and load `model` (default: settings.model)."""
    name = model or settings.model
    kw = {"progress": progress} if progress else {}
    path = resolve_model(open_catalog(settings), name, log=log, **kw)
    engine = load_engine(
        settings.engine,
        path,
        name,
        settings.context_length,
        settings.threads,
        settings.type_k,
        settings.type_v,
        k_bits=settings.k_bits,
        v_bits=settings.v_bits,
        expert_budget=settings.expert_budget,
        trace_routing=settings.trace_routing,
    )
    if governor is not None:
        info = engine.info()
        weights, cache = info.get("weights_bytes", 0), info.get("expert_cache")
        if cache:  # experts read on demand: the cache's budget is what they hold, not their size
            weights -= info["expert_bytes"]
            governor.reserve("expert_cache", cache["budget_bytes"])
        governor.reserve("weights", weights)
        governor.reserve("kv_cache", info.get("kv_bytes_allocated", 0))
    return engine
