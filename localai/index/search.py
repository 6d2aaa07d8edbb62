"""The personal document index: the public interface the CLI, the daemon and RAG use.

    index = Index.open(settings)                 # $LOCALAI_HOME/index.db, created if needed
                                                 # (optional: governor=, embedder= to share)
    index.add_source("~/docs")                   # remember a folder or file (absolute path)
    stats = index.update()                       # incremental index of every source → RunStats
    hits = index.search("how do I ...", k=10)    # list[Hit], best first (unit="chunk" | "file")
    passage = index.read(hits[0])                # Passage(text, verified, reason, ...)
    index.watch(stop_event, on_update=print)     # blocks: re-indexes saved files until stop is set
    index.check()                                # [] when consistent, else what is wrong
    index.close()

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

The index keeps no copy of document text (see store.py); text is re-read from the files.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..catalog import Catalog
from ..config import Settings
from ..governor import Governor
from . import MODES, UNITS, store
from .bm25 import Scorer
from .fusion import fts_query, fts_text, query_words, rrf, to_files
from .indexer import Indexer, Progress, RunStats
from .readback import Passage, Reader, location
from .vectors import DEFAULT_CODEC, VectorSet, codec
from .walk import BAD_NAME, bad_name

CANDIDATES = 100  # each list's depth before fusion
__all__ = ["Hit", "Index", "IndexError_", "Passage", "db_path", "hit_row", "location", "user_path"]


class IndexError_(ValueError):
    """A request the index cannot serve (unknown source, bad unit); the message says why."""


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    file_id: int
    path: str
    start_line: int
    end_line: int
    start_byte: int
    end_byte: int
    score: float
    hash: str
    bm25_rank: int | None = None
    vector_rank: int | None = None


def user_path(raw: str | Path, what: str = "path") -> Path:
    """`raw` as the index names paths: `~` expanded, absolute, `.` and `..` resolved by name as
    the walk resolves them (symlinks kept), so `c/../c` is the source `c`. An unknown `~user`,
    a NUL or a name that is not UTF-8 is an IndexError_ saying so, never a traceback."""
    p = _normal(raw, what)
    if bad_name(p):
        raise IndexError_(f"{what}: {str(raw)!r}: {BAD_NAME}")
    return p


def _normal(raw: str | Path, what: str) -> Path:
    """user_path without the UTF-8 check, for paths the walk reports on (watched files)."""
    if "\0" in str(raw):
        raise IndexError_(f"{what}: {str(raw)!r}: a path cannot hold a NUL character")
    try:
        return Path(os.path.abspath(Path(raw).expanduser()))
    except RuntimeError as e:  # "~someone" who is not a user here
        raise IndexError_(f"{what}: cannot expand ~ in {str(raw)!r}: no such user") from e


def db_path(settings: Settings) -> Path:
    return settings.home / "index.db"


class Index:
    def __init__(self, settings: Settings, governor: Governor | None = None, embedder=None):
        self.settings = settings
        self.path = db_path(settings)
        self.db = store.connect(self.path)
        self.governor = governor
        name = store.get_meta(self.db, "codec")
        if name is None:  # a new index takes the configured codec; an existing one keeps its own
            name = getattr(settings, "index_codec", DEFAULT_CODEC)
            with store.transaction(self.db):
                store.set_meta(self.db, "codec", name)
        self.codec = codec(name)
        # the model whose vectors the index holds; an index from before this key was recorded
        # was embedded by minilm-l6-int8, the only embedding model then (and still the default)
        self.embed_model = store.get_meta(self.db, "embed_model")
        if self.embed_model is None:
            self.embed_model = settings.embed_model
            with store.transaction(self.db):
                store.set_meta(self.db, "embed_model", self.embed_model)
        self._embedder = embedder  # loaded on first use unless shared by the caller
        self._vectors: VectorSet | None = None
        self._vectors_gen: str | None = None
        self._bm25: tuple[str, Scorer | None] | None = None  # (generation, scorer if layout tf)
        self._lock = threading.RLock()
        self._reader = Reader(self.count_tokens)

    @classmethod
    def open(cls, settings: Settings, governor: Governor | None = None, embedder=None) -> Index:
        """Open (creating) the index under settings.home; `embedder` may be shared (daemon)."""
        return cls(settings, governor, embedder)

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()
            if self.governor:
                self.governor.release("index_vectors")

    # sources ------------------------------------------------------------------------------

    def add_source(self, path: str | Path) -> Path:
        p = user_path(path)
        if not p.exists():
            raise IndexError_(f"{p} does not exist; nothing was added")
        with self._lock, store.transaction(self.db):
            self.db.execute("INSERT OR IGNORE INTO sources VALUES (?, ?)", [str(p), _now()])
        return p

    def sources(self) -> list[dict]:
        out = []
        with self._lock:
            for (path,) in self.db.execute("SELECT path FROM sources ORDER BY path"):
                prefix = path.rstrip("/") + "/"
                n, c = self.db.execute(
                    "SELECT count(DISTINCT f.id), count(c.id) "
                    "FROM files f LEFT JOIN chunks c ON c.file_id = f.id "
                    "WHERE f.skip_reason IS NULL AND (f.path = ? OR substr(f.path, 1, ?) = ?)",
                    [path, len(prefix), prefix],
                ).fetchone()
                out.append({"path": path, "files": n, "chunks": c, "exists": Path(path).exists()})
        return out

    def remove_source(self, path: str | Path) -> int:
        """Forget a source and every file under it; returns the number of files removed."""
        p = str(user_path(path))
        with self._lock:
            if not self.db.execute("SELECT 1 FROM sources WHERE path = ?", [p]).fetchone():
                known = [s["path"] for s in self.sources()]
                raise IndexError_(f"{p} is not a source; sources: {', '.join(known) or 'none'}")
            with store.transaction(self.db):
                self.db.execute("DELETE FROM sources WHERE path = ?", [p])
            others = [s["path"] for s in self.sources()]
            return self.forget(p, keep_under=others)

    def forget(self, path: str | Path, keep_under: list[str] = ()) -> int:
        """Drop every indexed file at or under `path` (except those under `keep_under`)."""
        p = str(_normal(path, "path")).rstrip("/")
        if bad_name(p):  # no indexed path has such a name
            return 0
        rows = self.db.execute(
            "SELECT id, path FROM files WHERE path = ? OR substr(path, 1, ?) = ?",
            [p, len(p) + 1, p + "/"],
        ).fetchall()
        n = 0
        for fid, fpath in rows:
            if any(fpath == k or fpath.startswith(k.rstrip("/") + "/") for k in keep_under):
                continue
            with self._lock, store.transaction(self.db):
                store.delete_file(self.db, fid)
                store.bump_generation(self.db)
            n += 1
        return n

    # indexing -----------------------------------------------------------------------------

    @property
    def embedder(self):
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
                from .embedder import Embedder

                cat = Catalog(self.settings.models_dir)
                name = self.settings.embed_model
                cat.ensure(name, log=lambda m: None)
                self._embedder = Embedder(
                    cat.file(name, "model.onnx"),
                    cat.file(name, "tokenizer.json"),
                    threads=self.settings.threads,
                )
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
        roots = [_normal(p, "path") for p in paths] if paths else None
        if roots is None:
            roots = [Path(s["path"]) for s in self.sources()]
        gone = [] if keep_missing else [r for r in roots if not r.exists()]
        roots = [r for r in roots if r not in gone]
        writer = store.connect(self.path)  # own connection: searches go on while this writes
        try:
            ix = Indexer(writer, self.path, self.codec, self.embedder.embed, self.count_tokens)
            stats = ix.run(roots, progress)
        finally:
            writer.conn.close()
        # forgotten after indexing, so that a moved file's new path finds its old chunks' codes
        removed = sum(self.forget(r) for r in gone)
        if removed:
            stats.removed += removed
            stats.files, stats.chunks = self.stats()["files"], self.stats()["chunks"]
        return stats

    def refeed_fts(self) -> int:
        """Rewrite every chunk's FTS rows from its file (after a change to what FTS is fed),
        one transaction per file; chunks whose file changed are left for the next update.
        Returns chunks rewritten."""
        n = 0
        files = self.db.execute("SELECT id, path FROM files WHERE skip_reason IS NULL").fetchall()
        for fid, path in files:
            fed = self._fed_texts(Path(path))
            rows = self.db.execute("SELECT id, hash FROM chunks WHERE file_id = ?", [fid])
            pairs = [(cid, fed[h]) for cid, h in rows.fetchall() if h in fed]
            with self._lock, store.transaction(self.db):
                store.delete_fts(self.db, [cid for cid, _ in pairs])
                store.write_fts(self.db, pairs)
                store.bump_generation(self.db)  # chunk lengths may have changed
            n += len(pairs)
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def upgrade_fts(self) -> dict:
        """Rebuild an older index's FTS (layout "full") in the current, smaller layout ("tf"),
        from the files; nothing to do on a current index. The files are read first; then one
        transaction swaps the tables, so searches see the old layout until the new one is
        complete, and other writers wait. A chunk whose file changed since it was indexed
        cannot be fed: it is dropped and its file marked for the next `update()` (which finds
        its unchanged chunks' vectors by content hash). Returns {"chunks", "stale_files"}."""
        if store.fts_layout(self.db) == "tf":
            return {"chunks": 0, "stale_files": 0}
        files = self.db.execute("SELECT id, path FROM files WHERE skip_reason IS NULL").fetchall()
        fed = {fid: self._fed_texts(Path(path)) for fid, path in files}
        n, stale = 0, 0
        with self._lock, store.transaction(self.db):
            store.replace_fts(self.db)
            for fid, texts in fed.items():
                rows = self.db.execute("SELECT id, hash FROM chunks WHERE file_id = ?", [fid])
                rows = rows.fetchall()
                pairs = [(cid, texts[h]) for cid, h in rows if h in texts]
                store.write_fts(self.db, pairs)
                n += len(pairs)
                if len(pairs) < len(rows):
                    store.mark_stale(self.db, fid, [cid for cid, h in rows if h not in texts])
                    stale += 1
            store.optimize_fts(self.db)
            store.bump_generation(self.db)
        store.reclaim_free_pages(self.db)  # the old table's pages go back to the disk
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"chunks": n, "stale_files": stale}

    def _fed_texts(self, path: Path) -> dict[bytes, str]:
        """What FTS receives for each chunk the file holds now, by content hash ({} if it is
        gone or unreadable)."""
        got = self._reader.rechunk(path)
        return {} if isinstance(got, str) else {c.hash: fts_text(c.text) for c in got[1]}

    def check(self) -> list[str]:
        with self._lock:
            return store.problems(self.db, self.codec.nbytes)

    def stats(self) -> dict:
        with self._lock:
            f, tb = self.db.execute(
                "SELECT count(*), coalesce(sum(text_bytes), 0) FROM files WHERE skip_reason IS NULL"
            ).fetchone()
            c = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            layout = store.fts_layout(self.db)
        return {"files": f, "chunks": c, "text_bytes": tb,
                "index_bytes": store.disk_bytes(self.path), "codec": self.codec.name,
                "fts_layout": layout}  # fmt: skip

    def watch(self, stop: threading.Event, on_update=None, debounce: float = 0.2,
              progress: Progress | None = None, on_error=None) -> None:  # fmt: skip
        """Block, re-indexing changed files under every source, until `stop` is set (a failed
        re-index is retried, see watcher.py)."""
        from .watcher import watch

        watch(self, stop, on_update=on_update, debounce=debounce, progress=progress,
              on_error=on_error)  # fmt: skip

    # searching ----------------------------------------------------------------------------

    def _vector_set(self) -> VectorSet:
        gen = store.get_meta(self.db, "generation", "0")
        if self._vectors is None or gen != self._vectors_gen:
            rows = self.db.execute("SELECT id, code FROM chunks ORDER BY id").fetchall()
            self._vectors = VectorSet.from_rows(self.codec, rows)
            self._vectors_gen = gen
            if self.governor:
                self.governor.reserve("index_vectors", self._vectors.nbytes)
        return self._vectors

    def _bm25_scorer(self) -> Scorer | None:
        """The current generation's scorer in layout "tf", None in layout "full" (an upgrade
        in another process bumps the generation, so this sees the new layout)."""
        gen = store.get_meta(self.db, "generation", "0")
        if self._bm25 is None or self._bm25[0] != gen:
            tf = store.fts_layout(self.db) == "tf"
            self._bm25 = (gen, Scorer(self.db) if tf else None)
        return self._bm25[1]

    def bm25_chunks(self, query: str, n: int = CANDIDATES) -> list[int]:
        q = fts_query(query)
        with self._lock:
            scorer = self._bm25_scorer()
            if scorer is not None:
                return scorer.search(self.db, query_words(query), n)
            if q is None:
                return []
            rows = self.db.execute(
                "SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY rank LIMIT ?", [q, n]
            )
            return [r[0] for r in rows]

    def vector_chunks(self, query: str | np.ndarray, n: int = CANDIDATES) -> list[int]:
        """The n nearest chunk ids. Embedding (the query, and the candidates when re-scoring)
        runs outside the index lock, so other searches of this Index do not wait for it."""
        qv = self.embedder.embed([query])[0] if isinstance(query, str) else query
        with self._lock:
            ids = self._vector_set().search(qv, n)[0].tolist()
        depth = min(getattr(self.settings, "vector_rescore", 0), len(ids))
        return self._rescored(ids[:depth], qv) + ids[depth:] if depth else ids

    def _rescored(self, ids: list[int], qv: np.ndarray) -> list[int]:
        """`ids` ordered by the exact cosine of embeddings recomputed from their text (the
        graph-plus-recompute idea without the graph: the codes only have to find candidates).
        A chunk whose file changed since indexing cannot be re-embedded as it was; it keeps
        its approximate place after the re-scored ones."""
        hits = self.hits(ids)
        fresh = [(h.chunk_id, p.text) for h, p in zip(hits, self.read_many(hits), strict=True)
                 if p.verified]  # fmt: skip
        if not fresh:
            return ids
        exact = self.embedder.embed([t for _, t in fresh]) @ qv.astype(np.float32)
        order = [fresh[i][0] for i in np.argsort(-exact, kind="stable")]
        done = set(order)
        return order + [c for c in ids if c not in done]

    def search(self, query: str, k: int = 10, unit: str = "chunk", mode: str = "hybrid",
               under: str | Path | None = None) -> list[Hit]:  # fmt: skip
        """Best `k` chunks (or files) for `query`; `under` keeps only files in that folder."""
        if unit not in UNITS:
            raise IndexError_(f"unit must be one of {UNITS}, not {unit!r}")
        if mode not in MODES:
            raise IndexError_(f"mode must be one of {MODES}, not {mode!r}")
        if k < 1:
            raise IndexError_(f"k must be at least 1, not {k}")
        depth = max(CANDIDATES, 3 * k) * (10 if under else 1)  # a folder filter thins lists
        prefix = str(_normal(under, "under")).rstrip("/") + "/" if under else None
        lists = []
        if mode in ("hybrid", "bm25"):
            lists.append(self.bm25_chunks(query, depth))
        if mode in ("hybrid", "vector"):
            lists.append(self.vector_chunks(query, depth))
        with self._lock:  # chunks deleted since the lists were made are left out here
            return self._hits(lists, mode, k, unit, prefix)

    def _hits(self, lists: list[list[int]], mode: str, k: int, unit: str,
              prefix: str | None = None) -> list[Hit]:  # fmt: skip
        ids = {c for lst in lists for c in lst}
        rows = self._chunk_rows(ids)
        if prefix:
            rows = {c: r for c, r in rows.items() if (r[2] + "/").startswith(prefix)}
        lists = [[c for c in lst if c in rows] for lst in lists]
        if unit == "file":
            file_of = {c: r[1] for c, r in rows.items()}
            best: dict[int, int] = {}
            for lst in lists:
                for c in lst:
                    best.setdefault(file_of[c], c)
            lists = [to_files(lst, file_of) for lst in lists]
            fused = rrf(lists)[:k]
            chosen = [(best[f], s, [_rank(lst, f) for lst in lists]) for f, s in fused]
        else:
            fused = rrf(lists)[:k]
            chosen = [(c, s, [_rank(lst, c) for lst in lists]) for c, s in fused]
        hits = []
        for c, score, ranks in chosen:
            r = rows[c]
            b_rank = ranks[0] if mode != "vector" else None
            v_rank = ranks[-1] if mode != "bm25" else None
            hits.append(_hit(r, score, b_rank, v_rank))
        return hits

    def hits(self, ids: list[int]) -> list[Hit]:
        """Unscored hits for chunk ids (those still in the index), in the given order."""
        with self._lock:
            rows = self._chunk_rows(set(ids))
        return [_hit(rows[c]) for c in ids if c in rows]

    def _chunk_rows(self, ids: set[int]) -> dict[int, tuple]:
        out = {}
        ids_l = list(ids)
        for i in range(0, len(ids_l), 500):
            part = ids_l[i : i + 500]
            marks = ",".join("?" * len(part))
            for row in self.db.execute(
                "SELECT c.id, c.file_id, f.path, c.start_byte, c.end_byte, c.start_line, "
                f"c.end_line, c.hash FROM chunks c JOIN files f ON f.id = c.file_id "
                f"WHERE c.id IN ({marks})",
                part,
            ):
                out[row[0]] = row
        return out

    # reading back -------------------------------------------------------------------------

    def read(self, hit: Hit) -> Passage:
        """The hit's text, re-read from its file and checked against the indexed hash."""
        return self.read_many([hit])[0]

    def read_many(self, hits: list[Hit]) -> list[Passage]:
        return self._reader.read_many(hits)


def hit_row(h: Hit, p: Passage) -> dict:
    """A hit and its passage as one JSON object (`localai search --json`, POST /localai/search)."""
    return {**asdict(h), "text": p.text, "verified": p.verified, "reason": p.reason,
            "pages": p.pages, "where": p.where}  # fmt: skip


def _hit(row: tuple, score: float = 0.0, bm25_rank: int | None = None,
         vector_rank: int | None = None) -> Hit:  # fmt: skip
    """A Hit from a _chunk_rows row (id, file_id, path, start_byte, end_byte, start_line,
    end_line, hash)."""
    c, fid, path, sb, eb, sl, el, h = row
    return Hit(c, fid, path, sl, el, sb, eb, score, h.hex(), bm25_rank, vector_rank)


def _rank(lst: list[int], item: int) -> int | None:
    try:
        return lst.index(item) + 1
    except ValueError:
        return None


def _now() -> float:
    import time

    return time.time()
