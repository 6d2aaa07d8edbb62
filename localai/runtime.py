"""Wiring shared by the CLI and the daemon: settings → a loaded engine, embedder, index.

The layers below know nothing of each other's parts: the engine is handed a resolved model
file, the index its settings and an embedder. This module is where the catalog, the settings and
the plugins meet them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import plugins
from .catalog import (
    Catalog,
    CatalogError,
    ModelSpec,
    ProgressFactory,
    load_catalog,
    resolve_model,
)
from .config import Settings
from .engine import Engine, load_engine
from .governor import Governor
from .private import safe_name
from .rag.prompt import DEFAULT_LAYOUT, Layout, UnknownLayout, layout_named

if TYPE_CHECKING:
    from .index.embedder import Embedder
    from .index.facade import Index


def model_specs(path: Path | None = None) -> dict[str, ModelSpec]:
    """The catalog's models (models/catalog.toml, or `path`) plus those that plugins register
    (catalog names win); each is checked by check_rag_layout."""
    specs = {name: check_rag_layout(spec) for name, spec in load_catalog(path).items()}
    plugins.get().call_each(
        "localai_register_models",
        register=lambda spec: specs.setdefault(spec.name, check_rag_layout(spec)),
    )
    return specs


def check_rag_layout(spec: ModelSpec) -> ModelSpec:
    """`spec`, if RAG has the layout it names; a spec that names none is refused (a plugin's is
    recorded as that plugin's error), so a typo fails at start, not at the first question."""
    try:
        layout_named(spec.rag_layout)
    except UnknownLayout as e:
        raise CatalogError(f"model {spec.name}: {e}") from None
    return spec


def model_spec(name: str) -> ModelSpec | None:
    """The spec of a loaded engine's model (`engine.name`); None for a model loaded from a .gguf
    path, which has no catalog entry."""
    return model_specs().get(name)


def model_layout(name: str) -> Layout:
    """How answers from documents are laid out for the model `name` (an engine's name): as its
    catalog entry says; the default for a model loaded from a .gguf path (no entry, so nothing
    known about how it follows an example)."""
    spec = model_spec(name)
    return layout_named(spec.rag_layout) if spec else DEFAULT_LAYOUT


def model_passage_tokens(name: str) -> int:
    """How long a passage may be for the model `name` (its catalog `rag_passage_tokens`, see
    rag/trim.py); 0, whole passages, for a model with no entry."""
    spec = model_spec(name)
    return spec.rag_passage_tokens if spec else 0


def passage_spans_file(settings: Settings, name: str) -> Path | None:
    """Where answers remember which span of each trimmed passage they read (rag/trim.py), beside
    the passages' KV; None when no passages' KV is kept."""
    if settings.passage_kv_bytes <= 0:
        return None
    return settings.home / "kv" / "passages" / f"spans.{safe_name(name)}.json"


def open_catalog(settings: Settings) -> Catalog:
    return Catalog(settings.models_dir, model_specs())


def engine_loader(
    settings: Settings,
    model: str | None = None,
    progress: ProgressFactory | None = None,
    log=print,
    governor: Governor | None = None,
) -> Callable[[], Engine]:
    """Resolve (pulling if needed) `model` once; the function that loads it, as often as the
    daemon reloads it after an idle unload (keepalive.py), into what `governor`'s RAM budget
    leaves it then (the whole budget of the settings without one)."""
    name = model or settings.model
    if settings.engine == "remote":  # the server holds the model: nothing to resolve or pull
        from .engine.remote import RemoteEngine

        return lambda: RemoteEngine(settings.remote_url, settings.remote_api_key, name,
                                    settings.context_length, log=log)  # fmt: skip
    kw = {"progress": progress} if progress else {}
    path = resolve_model(open_catalog(settings), name, log=log, **kw)

    def load() -> Engine:
        ram = (governor or Governor(settings.ram_budget_bytes)).left(ENGINE_HOLDERS)
        engine = load_engine(settings.engine, path, name, settings.context_length,
                             settings.threads, settings.type_k, settings.type_v,
                             k_bits=settings.k_bits, v_bits=settings.v_bits,
                             expert_budget=settings.expert_budget,
                             trace_routing=settings.trace_routing,
                             expert_prefetch=settings.expert_prefetch,
                             expert_policy=settings.expert_policy,
                             attn_budget=settings.attn_budget,
                             sparse_prefill=settings.sparse_prefill,
                             kv_budget=settings.kv_budget,
                             kv_dir=settings.home / "kv-pages", ram_budget=ram)  # fmt: skip
        keep_prefixes_on_disk(engine, settings)
        return engine

    return load


def keep_prefixes_on_disk(engine: Engine, settings: Settings) -> None:
    """Give an engine that keeps fixed prompt prefixes a folder to keep them in across
    processes ($LOCALAI_HOME/kv, engine/prefix.py), and one that can move KV a folder for
    passages' KV ($LOCALAI_HOME/kv/passages, engine/pieces.py)."""
    identity = getattr(engine, "prefix_identity", None)
    if identity is None:
        return
    from .engine.prefix import DiskStore, model_digest

    ident = identity() | {"model": model_digest(Path(engine.path))}
    engine.prefixes.disk = DiskStore(settings.home / "kv", engine.name, ident)
    if getattr(engine, "moves_kv", False) and settings.passage_kv_bytes > 0:
        folder, most = settings.home / "kv" / "passages", settings.passage_kv_bytes
        engine.pieces.disk = DiskStore(folder, engine.name, ident, 2**31, most)
        engine.pieces.exact = settings.passage_kv_reuse == "exact"


def open_engine(
    settings: Settings,
    model: str | None = None,
    progress: ProgressFactory | None = None,
    log=print,
    governor: Governor | None = None,
) -> Engine:
    """Resolve (pulling if needed) and load `model` (default: settings.model)."""
    engine = engine_loader(settings, model, progress, log, governor)()
    if governor is not None:
        reserve_engine(governor, engine.info())
    return engine


def reserve_engine(governor: Governor, info: dict) -> None:
    """Reserve a loaded engine's bytes by holder (`info` is its Engine.info())."""
    weights, cache = info.get("weights_bytes", 0), info.get("expert_cache")
    if cache:  # experts read on demand: the cache's budget is what they hold, not their size
        weights -= info["expert_bytes"]
        governor.reserve("expert_cache", cache["budget_bytes"])
    governor.reserve("weights", weights)
    governor.reserve("kv_cache", info.get("kv_bytes_allocated", 0))


ENGINE_HOLDERS = ("weights", "kv_cache", "expert_cache")


def open_embedder(settings: Settings) -> Embedder:
    """The embedding model settings.embed_model, pulled first if it is missing or damaged."""
    from .index.embedder import Embedder

    cat = Catalog(settings.models_dir)
    name = settings.embed_model
    cat.ensure(name, log=lambda _m: None)
    return Embedder(cat.file(name, "model.onnx"), cat.file(name, "tokenizer.json"),
                    threads=settings.threads)  # fmt: skip


def open_index(settings: Settings, governor: Governor | None = None) -> Index:
    """The document index under settings.home; its embedder is loaded on first use, so commands
    that embed nothing (`localai sources`) never load it."""
    from .index.facade import Index  # the index stays out of commands that do not use it

    return Index.open(settings, embedder=lambda: open_embedder(settings), governor=governor)
