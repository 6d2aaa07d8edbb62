"""The sqlite store: the seam (seam.py) over one index file, through store.py's schema.

Searching keeps two per-generation caches in RAM, as the index always has: every vector code
decoded into one VectorSet (its size told to `on_vectors`, the RAM budget), and the BM25 scorer's
chunk lengths. Both are rebuilt when the generation moves (a write here or in another process).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import store
from .bm25 import Scorer
from .fusion import fts_query, query_words
from .seam import ChunkRow, FileRow, chunked
from .vectors import Codec, VectorSet
from .walk import bad_name


class SqliteStore:
    kind = "sqlite"

    def __init__(self, path: Path, on_vectors: Callable[[int], None] | None = None,
                 codec: Codec | None = None):  # fmt: skip
        self.path, self.where = path, str(path)
        self.db = store.connect(path)
        self.codec, self.on_vectors = codec, on_vectors
        self._vectors: tuple[str, VectorSet] | None = None  # (generation, set)
        self._bm25: tuple[str, Scorer | None] | None = None  # (generation, scorer if layout tf)

    def transaction(self):
        return store.transaction(self.db)

    def writer(self) -> SqliteStore:
        return SqliteStore(self.path, codec=self.codec)

    def close(self) -> None:
        self.db.conn.close()

    # meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        return store.get_meta(self.db, key, default)

    def set_meta(self, key: str, value: str) -> None:
        store.set_meta(self.db, key, value)

    def setdefault_meta(self, key: str, value: str) -> str:
        self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", [key, value])
        return store.get_meta(self.db, key)

    def bump_generation(self) -> None:
        store.bump_generation(self.db)

    def generation(self) -> str:
        return store.get_meta(self.db, "generation", "0")

    # sources and files --------------------------------------------------------------------

    def add_source(self, path: str) -> None:
        import time

        self.db.execute("INSERT OR IGNORE INTO sources VALUES (?, ?)", [path, time.time()])

    def source_paths(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM sources ORDER BY path")]

    def delete_source(self, path: str) -> bool:
        return self.db.execute("DELETE FROM sources WHERE path = ?", [path]).rowcount > 0

    def counts_under(self, path: str) -> tuple[int, int]:
        prefix = path.rstrip("/") + "/"
        return self.db.execute(
            "SELECT count(DISTINCT f.id), count(c.id) "
            "FROM files f LEFT JOIN chunks c ON c.file_id = f.id "
            "WHERE f.skip_reason IS NULL AND (f.path = ? OR substr(f.path, 1, ?) = ?)",
            [path, len(prefix), prefix],
        ).fetchone()

    def files_under(self, path: str) -> dict[str, FileRow]:
        if bad_name(path):  # no file with such a name is recorded (the walk skips them)
            return {}
        p = path.rstrip("/")
        rows = self.db.execute(
            "SELECT path, id, size, mtime_ns, sha256, skip_reason FROM files "
            "WHERE path = ? OR substr(path, 1, ?) = ?",
            [p, len(p) + 1, p + "/"],
        )
        return {r[0]: tuple(r[1:]) for r in rows}

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?",
                        [size, mtime_ns, file_id])  # fmt: skip

    def upsert_file(self, path: str, values: list) -> int:
        """values: size, mtime_ns, sha256, loader, text_bytes, skip_reason, indexed_at."""
        cur = self.db.execute(
            "INSERT INTO files (path, size, mtime_ns, sha256, loader, text_bytes, skip_reason,"
            " indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET "
            "size=excluded.size, mtime_ns=excluded.mtime_ns, sha256=excluded.sha256, "
            "loader=excluded.loader, text_bytes=excluded.text_bytes, "
            "skip_reason=excluded.skip_reason, indexed_at=excluded.indexed_at RETURNING id",
            [path, *values],
        )
        return cur.fetchone()[0]

    def replace_chunks(self, file_id: int, rows: list[tuple], texts: list[str]) -> None:
        store.delete_file_chunks(self.db, file_id)
        store.insert_chunks(self.db, file_id, rows, texts)

    def delete_file_chunks(self, file_id: int) -> int:
        return store.delete_file_chunks(self.db, file_id)

    def delete_file(self, file_id: int) -> int:
        return store.delete_file(self.db, file_id)

    def known_codes(self, hashes: list[bytes], nbytes: int) -> dict[bytes, bytes]:
        known: dict[bytes, bytes] = {}
        for part in chunked(list(set(hashes))):
            marks = ",".join("?" * len(part))
            sql = f"SELECT hash, code FROM chunks WHERE hash IN ({marks})"
            known.update((h, c) for h, c in self.db.execute(sql, part) if len(c) == nbytes)
        return known

    def after_run(self, optimize: bool) -> None:
        if optimize:  # merge the FTS5 segments a bulk load leaves (the indexer says when)
            with store.transaction(self.db):
                store.optimize_fts(self.db)
        store.reclaim_free_pages(self.db)
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # so index_bytes is the real size

    def live_files(self) -> list[tuple[int, str]]:
        return self.db.execute("SELECT id, path FROM files WHERE skip_reason IS NULL").fetchall()

    def file_chunks(self, file_id: int) -> list[tuple[int, bytes]]:
        return self.db.execute("SELECT id, hash FROM chunks WHERE file_id = ?",
                               [file_id]).fetchall()  # fmt: skip

    def rewrite_fts(self, pairs: list[tuple[int, str]]) -> None:
        store.delete_fts(self.db, [cid for cid, _ in pairs])
        store.write_fts(self.db, pairs)

    # reporting ----------------------------------------------------------------------------

    def totals(self) -> tuple[int, int, int]:
        f, tb = self.db.execute(
            "SELECT count(*), coalesce(sum(text_bytes), 0) FROM files WHERE skip_reason IS NULL"
        ).fetchone()
        return f, tb, self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def disk_bytes(self) -> int:
        return store.disk_bytes(self.path)

    def fts_layout(self) -> str:
        return store.fts_layout(self.db)

    def problems(self, code_bytes: int | None) -> list[str]:
        return store.problems(self.db, code_bytes)

    # searching ----------------------------------------------------------------------------

    def bm25(self, query: str, n: int) -> list[int]:
        gen = self.generation()
        if self._bm25 is None or self._bm25[0] != gen:  # an upgrade elsewhere moves it too
            tf = store.fts_layout(self.db) == "tf"
            self._bm25 = (gen, Scorer(self.db) if tf else None)
        scorer = self._bm25[1]
        if scorer is not None:
            return scorer.search(self.db, query_words(query), n)
        q = fts_query(query)  # layout "full": FTS5's own bm25()
        if q is None:
            return []
        rows = self.db.execute(
            "SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY rank LIMIT ?", [q, n]
        )
        return [r[0] for r in rows]

    def vector_set(self) -> VectorSet:
        gen = self.generation()
        if self._vectors is None or self._vectors[0] != gen:
            rows = self.db.execute("SELECT id, code FROM chunks ORDER BY id").fetchall()
            self._vectors = (gen, VectorSet.from_rows(self.codec, rows))
            if self.on_vectors:
                self.on_vectors(self._vectors[1].nbytes)
        return self._vectors[1]

    def nearest(self, query: np.ndarray, n: int) -> list[int]:
        return self.vector_set().search(query, n)[0].tolist()

    def drop_caches(self) -> int:
        freed = self._vectors[1].nbytes if self._vectors is not None else 0
        self._vectors = None
        return freed

    def chunk_rows(self, ids: set[int]) -> dict[int, ChunkRow]:
        out = {}
        for part in chunked(list(ids)):
            marks = ",".join("?" * len(part))
            for row in self.db.execute(
                "SELECT c.id, c.file_id, f.path, c.start_byte, c.end_byte, c.start_line, "
                f"c.end_line, c.hash FROM chunks c JOIN files f ON f.id = c.file_id "
                f"WHERE c.id IN ({marks})",
                part,
            ):
                out[row[0]] = row
        return out
