"""What the routes share: the loaded engine, its generation slot, the embedder, the RAG answerer.

The embedder is loaded on first use (many clients never ask for embeddings) on a worker thread,
once, behind a lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ..engine import Engine
from .slot import Slot

if TYPE_CHECKING:  # types only: the routes import this module, and only some use these parts
    from ..governor import Governor
    from ..index.embedder import Embedder
    from ..index.facade import Index
    from ..rag.answer import Answerer
    from .residency import Keeper


@dataclass
class ServerState:
    engine: Engine
    embed_model: str
    load_embedder: Callable[[], Embedder]  # may pull the model files once
    rag: Answerer | None = None  # when the document index is available
    rag_missing: str = "answers from documents are not built yet"
    model_meta: dict = field(default_factory=dict)  # name -> size, digest, details (Ollama)
    index: Index | None = None
    governor: Governor | None = None
    keeper: Keeper | None = None  # idle unload and idle exit (residency.py)
    proof_key: str = ""  # this home's token: the daemon proves itself with it (auth.proof)
    on_source_added: Callable[[Path], None] | None = None  # re-index and watch a new source
    index_progress: Callable[[], dict] | None = None  # the watcher's run in progress
    slot: Slot = field(default_factory=Slot)
    started_at: float = field(default_factory=time.time)
    _embedder: Embedder | None = None
    _embed_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def model(self) -> str:
        return self.engine.name

    async def embedder(self) -> Embedder:
        async with self._embed_lock:
            if self._embedder is None:
                self._embedder = await anyio.to_thread.run_sync(self.load_embedder)
        return self._embedder
