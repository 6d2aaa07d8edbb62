"""The personal document index: the public interface the CLI, the daemon and RAG use.

    index = Index.open(settings, embedder=...)   # $LOCALAI_HOME/index.db, created if needed
                                                 # (optional: governor= for the RAM budget)
    index.add_source("~/docs")                   # remember a folder or file (absolute path)
    stats = index.update()                       # incremental index of every source → RunStats
    hits = index.search("how do I ...", k=10)    # list[Hit], best first (unit="chunk" | "file")
    passage = index.read(hits[0])                # Passage(text, verified, reason, ...)
    index.watch(stop_event, on_update=print)     # blocks: re-indexes saved files until stop is set
    index.check()                                # [] when consistent, else what is wrong
    index.close()

The index knows nothing of models: its caller hands it the settings it reads (IndexSettings;
localai.config.Settings has them) and an embedder, or a function that loads one on first use
(`localai.runtime.open_index` passes `runtime.open_embedder`), so commands that embed nothing
(`localai sources`) never load the model.

Stable contract:
- `Hit` fields: chunk_id, file_id, path, start_line, end_line (1-based, inclusive), start_byte,
  end_byte (end exclusive), score (higher is better; fused RRF score in hybrid mode), hash (hex
  content hash), bm25_rank and vector_rank (1-based rank in each list, None if absent).
- `read(hit)` never returns stale text silently: `verified` is True only when the file still
  holds a chunk with that content hash (then `reason` is "" or a note such as "moved within the
  file"); otherwise `reason` says why, and `text` is the bytes now at the recorded range (or ""
  when the file is gone).
- `search(..., mode=)` is "hybrid" (default), "bm25" or "vector"; `under=` keeps only files
  at or under a folder (or that file).
- Thread use: search/read from any thread; `update()` and `watch()` write through their own
  sqlite connection, so searches keep working (WAL) while indexing runs.

The stages: indexer.py writes, search.py ranks, readback.py re-reads passages, fts_upgrade.py
re-feeds FTS, watcher.py follows file changes. The index keeps no copy of document text (see
store.py); text is re-read from the files.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import IndexError_, fts_upgrade
from .indexer import Indexer, Progress, RunStats
from .paths import normal_path, user_path
from .readback import Passage, Reader
from .seam import open_store
from .search import CANDIDATES, Hit, Searcher
from .vectors import codec
from .walk import bad_name

if TYPE_CHECKING:
    from .embedder import Embedder


class IndexSettings(Protocol):
    """What the index reads of the settings (localai.config.Settings has all of it)."""

    home: Path  # the index is home / "index.db", unless index_store names a PostgreSQL URI
    index_store: str  # "" (sqlite under home) or a libpq URI: postgresql://…
    index_codec: str  # vector codes of a new index (an existing one keeps its own)
    embed_model: str  # must be the model whose vectors the index holds
    vector_rescore: int  # vector search re-scores its top N by exact cosine (0: off)


class Ledger(Protocol):
    """The RAM budget the vector set is reserved under (localai.governor.Governor)."""

    def reserve(self, holder: str, nbytes: int) -> None: ...

    def release(self, holder: str) -> None: ...


def db_path(settings: IndexSettings) -> Path:
    return settings.home / "index.db"


class Index:
    def __init__(self, settings: IndexSettings,
                 embedder: Embedder | Callable[[], Embedder] | None = None,
                 governor: Ledger | None = None):  # fmt: skip
        self.settings = settings
        self.governor = governor
        on_vectors = (lambda n: governor.reserve("index_vectors", n)) if governor else None
        self.store = open_store(settings.home, getattr(settings, "index_store", ""), on_vectors)
        # what messages name: the sqlite file, or the URI (without its password)
        self.path = getattr(self.store, "path", self.store.where)
        self.db = getattr(self.store, "db", None)  # the sqlite store's connection (tests, tools)
        # a new index takes the configured codec and embedding model; an existing one keeps its
        # own. One without the model recorded was embedded by minilm-l6-int8, the only embedding
        # model then (and still the default)
        self.codec = codec(self._meta_once("codec", settings.index_codec))
        self.store.codec = self.codec
        self.embed_model = self._meta_once("embed_model", settings.embed_model)
        # a loaded embedder is used as it is (shared: the daemon, tests); a function loading one
        # is called on first use
        self._embedder = None if callable(embedder) else embedder
        self._load_embedder = embedder if callable(embedder) else None
        self._lock = threading.RLock()
        self._reader = Reader(self.count_tokens)
        self.searcher = Searcher(self.store, self._lock, lambda texts: self.embedder.embed(texts),
                                 self.read_many)  # fmt: skip

    def _meta_once(self, key: str, value: str) -> str:
        """The recorded value of `key`, recording `value` if there is none yet; when two
        processes create an index at once, both get the value that was recorded first. Read
        first: an open that writes nothing takes no write lock (searches while indexing)."""
        got = self.store.get_meta(key)
        if got is None:
            with self.store.transaction():
                got = self.store.setdefault_meta(key, value)
        return got

    @classmethod
    def open(cls, settings: IndexSettings,
             embedder: Embedder | Callable[[], Embedder] | None = None,
             governor: Ledger | None = None) -> Index:  # fmt: skip
        """Open (creating) the index under settings.home; `embedder` may be shared (daemon)."""
        return cls(settings, embedder, governor)

    def close(self) -> None:
        with self._lock:
            self.store.close()
            if self.governor:
                self.governor.release("index_vectors")

    def drop_caches(self) -> int:
        """Give back what searching keeps in RAM (the vectors, re-chunked files); the bytes
        freed. The next search rebuilds them (the governor asks under memory pressure)."""
        freed = self.searcher.drop_vectors()
        if self.governor:
            self.governor.release("index_vectors")
        return freed + self._reader.clear()

    def cache_bytes(self) -> int:
        """RAM held by re-chunked files kept for read-back (the vectors reserve their own)."""
        return self._reader.nbytes()

    # sources ------------------------------------------------------------------------------

    def add_source(self, path: str | Path) -> Path:
        p = user_path(path)
        if not p.exists():
            raise IndexError_(f"{p} does not exist; nothing was added")
        with self._lock, self.store.transaction():
            self.store.add_source(str(p))
        return p

    def sources(self) -> list[dict]:
        out = []
        with self._lock:
            for path in self.store.source_paths():
                n, c = self.store.counts_under(path)
                out.append({"path": path, "files": n, "chunks": c, "exists": Path(path).exists()})
        return out

    def remove_source(self, path: str | Path) -> int:
        """Forget a source and every file under it; returns the number of files removed."""
        p = str(user_path(path))
        with self._lock:
            with self.store.transaction():
                removed = self.store.delete_source(p)
            if not removed:
                known = [s["path"] for s in self.sources()]
                raise IndexError_(f"{p} is not a source; sources: {', '.join(known) or 'none'}")
            others = [s["path"] for s in self.sources()]
            return self.forget(p, keep_under=others)

    def forget(self, path: str | Path, keep_under: list[str] = ()) -> int:
        """Drop every indexed file at or under `path` (except those under `keep_under`)."""
        p = str(normal_path(path, "path")).rstrip("/")
        if bad_name(p):  # no indexed path has such a name
            return 0
        with self._lock:
            rows = self.store.files_under(p)
        n = 0
        for fpath, row in rows.items():
            if any(fpath == k or fpath.startswith(k.rstrip("/") + "/") for k in keep_under):
                continue
            with self._lock, self.store.transaction():
                self.store.delete_file(row[0])
                self.store.bump_generation()
            n += 1
        return n

    # indexing -----------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        if self.settings.embed_model != self.embed_model:
            # its backends (bf16 torch, int8 ONNX) share one vector space; two models do not
            raise IndexError_(
                f"this index holds {self.embed_model} vectors, but embed_model is "
                f"{self.settings.embed_model}; their vectors cannot be compared, so nothing was "
                f'embedded or searched by vector. Set embed_model = "{self.embed_model}" in '
                f"config.toml, or delete {self.path} and run `localai index` to rebuild the "
                "index with the new model"
            )
        with self._lock:
            if self._embedder is None:
                if self._load_embedder is None:
                    raise IndexError_(
                        "this index was opened without an embedder: it can search by BM25 "
                        "only (mode bm25), and index nothing"
                    )
                self._embedder = self._load_embedder()
            return self._embedder

    def count_tokens(self, texts: list[str]) -> list[int]:
        from .embedder import encodable

        encs = self.embedder.tokenizer.encode_batch([encodable(t) for t in texts],
                                                    add_special_tokens=False)  # fmt: skip
        return [len(e.ids) for e in encs]

    def update(self, paths: list[str | Path] | None = None, progress: Progress | None = None,
               keep_missing: bool = True) -> RunStats:  # fmt: skip
        """Index `paths` (default: every source) incrementally; returns the run's stats.

        `keep_missing=False` removes a path that no longer exists (the watcher's deletions);
        by default a missing source is kept, in case its disk is only unmounted."""
        roots = [normal_path(p, "path") for p in paths] if paths else None
        if roots is None:
            roots = [Path(s["path"]) for s in self.sources()]
        gone = [] if keep_missing else [r for r in roots if not r.exists()]
        roots = [r for r in roots if r not in gone]
        embed = self.embedder.embed  # before connecting: a wrong model is said first
        writer = self.store.writer()  # own connection: searches go on while this writes
        try:
            stats = Indexer(writer, self.codec, embed, self.count_tokens).run(roots, progress)
        finally:
            writer.close()
        # forgotten after indexing, so that a moved file's new path finds its old chunks' codes
        removed = sum(self.forget(r) for r in gone)
        if removed:
            stats.removed += removed
            stats.files, stats.chunks = self.stats()["files"], self.stats()["chunks"]
        return stats

    def refeed_fts(self) -> int:
        """Rewrite every chunk's FTS rows from its file (after a change to what FTS is fed);
        see fts_upgrade.refeed. Returns chunks rewritten."""
        return fts_upgrade.refeed(self.store, self._lock, self._reader)

    def upgrade_fts(self) -> dict:
        """Rebuild an older index's FTS (layout "full") in the current, smaller layout ("tf");
        see fts_upgrade.upgrade. Returns {"chunks", "stale_files"}."""
        if self.store.kind != "sqlite":  # its terms have always been kept with their tf
            return {"chunks": 0, "stale_files": 0}
        return fts_upgrade.upgrade(self.db, self._lock, self._reader)

    def export(self, uri: str, progress=None) -> dict:
        """Copy this sqlite index into the PostgreSQL database at `uri` without re-embedding
        (see export.py); returns {"files", "chunks", "skipped_same"}."""
        from .export import export
        from .pg_store import PgStore

        if self.store.kind != "sqlite":
            raise IndexError_(f"--export copies a sqlite index; this one is in {self.path}")
        dest = PgStore(uri, self.codec)
        try:
            with self._lock:
                return export(self.store, dest, progress)
        finally:
            dest.close()

    def check(self) -> list[str]:
        with self._lock:
            return self.store.problems(self.codec.nbytes)

    def stats(self) -> dict:
        with self._lock:
            f, tb, c = self.store.totals()
            layout, nbytes = self.store.fts_layout(), self.store.disk_bytes()
        return {"files": f, "chunks": c, "text_bytes": tb, "index_bytes": nbytes,
                "codec": self.codec.name, "fts_layout": layout}  # fmt: skip

    def watch(self, stop: threading.Event, on_update=None, debounce: float = 0.2,
              progress: Progress | None = None, on_error=None) -> None:  # fmt: skip
        """Block, re-indexing changed files under every source, until `stop` is set (a failed
        re-index is retried, see watcher.py)."""
        from .watcher import watch

        watch(self, stop, on_update=on_update, debounce=debounce, progress=progress,
              on_error=on_error)  # fmt: skip

    # searching (search.py) ----------------------------------------------------------------

    def search(self, query: str, k: int = 10, unit: str = "chunk", mode: str = "hybrid",
               under: str | Path | None = None) -> list[Hit]:  # fmt: skip
        """Best `k` chunks (or files) for `query`; `under` keeps only files in that folder."""
        return self.searcher.search(query, k, unit, mode, under, self.settings.vector_rescore)

    def bm25_chunks(self, query: str, n: int = CANDIDATES) -> list[int]:
        return self.searcher.bm25_chunks(query, n)

    def vector_chunks(self, query: str | np.ndarray, n: int = CANDIDATES) -> list[int]:
        """The n nearest chunk ids (the first settings.vector_rescore re-scored)."""
        return self.searcher.vector_chunks(query, n, self.settings.vector_rescore)

    def hits(self, ids: list[int]) -> list[Hit]:
        """Unscored hits for chunk ids (those still in the index), in the given order."""
        return self.searcher.hits(ids)

    # reading back (readback.py) -----------------------------------------------------------

    def read(self, hit: Hit) -> Passage:
        """The hit's text, re-read from its file and checked against the indexed hash."""
        return self.read_many([hit])[0]

    def read_many(self, hits: list[Hit]) -> list[Passage]:
        return self._reader.read_many(hits)
