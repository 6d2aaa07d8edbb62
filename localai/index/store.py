"""The index store: one sqlite file (WAL) holding sources, files, chunks, FTS5 and vector codes.

Schema changes are numbered migrations (`MIGRATIONS[i]` is version i + 1), each applied in its
own transaction and recorded in the `migrations` table, so a blank database and an old one end up
with the same schema.

The store never holds document text. Chunks point into their files (byte range, line range) and
carry a content hash; the FTS5 tables are *contentless* (`content=''`, `contentless_delete=1`),
so they keep only the inverted index. Measured on NFCorpus this ranks exactly like an FTS5 table
that stores the text (same tokenizer, same bm25()), at a fraction of the bytes; see BENCHMARKS.md.

The FTS layout is recorded in meta `fts_layout`:
- "tf" (every index created since migration 2): `fts` with detail=none plus the repeated-term
  side table `fts_tf`, ranked by bm25.Scorer; 0.185 of the text's bytes instead of 0.32;
- "full" (older indexes): one detail=full `fts` table ranked by FTS5's bm25(); it keeps working
  as it is, and `Index.upgrade_fts()` (`localai index --upgrade`) rebuilds it as "tf".

Invariants (checked by `problems()`, asserted by the crash test):
- every chunk has exactly one FTS row with the same rowid, and one vector code of the codec size;
- every FTS row (and, in layout "tf", every `fts_tf` row) belongs to a chunk; every chunk belongs
  to a file row; a chunk's `fts_tf` row is written and deleted with its `fts` row;
- a file's chunks are written in the same transaction as its `files` row, so a file whose row
  has a given sha256 has exactly the chunks of that content.

SQLite comes from pysqlite3 (3.51) because the standard library's 3.40 cannot delete from a
contentless FTS5 table without the original text, which the store does not keep.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pysqlite3.dbapi2 as sqlite3
import sqlite_utils

from ..private import private_file, tighten
from .bm25 import TF_TOKENIZER, TOKENIZER, tf_rows
from .chunker import HASH_BYTES

_FTS_OPTS = "content='', contentless_delete=1"
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another writer before "database is locked"


def _m1_base(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("CREATE TABLE sources (path TEXT PRIMARY KEY, added_at REAL NOT NULL)")
    db.execute(
        """CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            sha256 TEXT,
            loader TEXT,
            text_bytes INTEGER NOT NULL DEFAULT 0,
            skip_reason TEXT,
            indexed_at REAL NOT NULL)"""
    )
    # AUTOINCREMENT: a chunk id is never reused, so a stale id held by a reader cannot point at
    # another chunk after a re-index.
    db.execute(
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            file_id INTEGER NOT NULL REFERENCES files(id),
            ord INTEGER NOT NULL,
            start_byte INTEGER NOT NULL,
            end_byte INTEGER NOT NULL,
            start_line INTEGER NOT NULL,
            end_line INTEGER NOT NULL,
            hash BLOB NOT NULL,
            code BLOB NOT NULL,
            UNIQUE (file_id, ord))"""
    )
    db.execute("CREATE INDEX chunks_hash ON chunks(hash)")
    db.execute(  # layout "full", as every index had it before migration 2
        f"CREATE VIRTUAL TABLE fts USING fts5(text, {_FTS_OPTS}, tokenize='{TOKENIZER}')"
    )


def _m2_fts_layout(db: sqlite_utils.Database) -> None:
    """An index without chunks yet takes the small "tf" layout; one with chunks keeps its
    detail=full table (its text is in the files, not here) until `Index.upgrade_fts()`."""
    has_chunks = db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone()
    if has_chunks:
        set_meta(db, "fts_layout", "full")
    else:
        replace_fts(db)


def _m3_short_hashes(db: sqlite_utils.Database) -> None:
    """Chunk hashes keep their first HASH_BYTES bytes (16 before) and files record their sha256
    as 32 raw bytes instead of 64 hex digits: on NFCorpus (one small file per document) the two
    took 0.04 of the text's bytes, with their index. A prefix of the old hash is exactly what
    the chunker now computes, so no chunk is re-embedded or reads back as changed."""
    db.execute(f"UPDATE chunks SET hash = substr(hash, 1, {HASH_BYTES}) "
               f"WHERE length(hash) > {HASH_BYTES}")  # fmt: skip
    db.execute("UPDATE files SET sha256 = unhex(sha256) WHERE typeof(sha256) = 'text'")


def _m4_normal_sources(db: sqlite_utils.Database) -> None:
    """Sources named as the walk names files (`.` and `..` resolved, no trailing slash): one
    added as `c/../c` was kept as given, so none of its files were counted under it."""
    for path, added in db.execute("SELECT path, added_at FROM sources").fetchall():
        normal = os.path.normpath(path)
        if normal != path:
            db.execute("DELETE FROM sources WHERE path = ?", [path])
            db.execute("INSERT OR IGNORE INTO sources VALUES (?, ?)", [normal, added])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _m1_base,
    _m2_fts_layout,
    _m3_short_hashes,
    _m4_normal_sources,
]


def replace_fts(db: sqlite_utils.Database) -> None:
    """Drop the FTS tables (all their rows) and create empty ones in layout "tf"; the caller
    refills them in the same transaction."""
    db.execute("DROP TABLE IF EXISTS fts")
    db.execute("DROP TABLE IF EXISTS fts_tf")
    db.execute(
        f"CREATE VIRTUAL TABLE fts USING fts5(text, {_FTS_OPTS}, detail=none, "
        f"tokenize='{TOKENIZER}')"
    )
    db.execute(
        f"CREATE VIRTUAL TABLE fts_tf USING fts5(text, {_FTS_OPTS}, detail=none, "
        f'tokenize="{TF_TOKENIZER}")'
    )
    set_meta(db, "fts_layout", "tf")


def fts_layout(db: sqlite_utils.Database) -> str:
    """The FTS layout in use; an index from before the key was recorded is "full"."""
    return get_meta(db, "fts_layout", "full")


def connect(path: Path) -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the index database at `path`."""
    private_file(path)  # the vocabulary and the paths are private; sqlite gives the WAL
    for side in ("-wal", "-shm"):  # and shm files the database's mode (older ones: tightened)
        tighten(path.with_name(path.name + side))
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)  # fmt: skip
    # incremental auto-vacuum (takes effect on a new file only): pages freed by re-indexing go
    # back to the file system at the end of each run instead of staying in index_bytes
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never torn
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    db = sqlite_utils.Database(conn)
    migrate(db)
    return db


def schema_version(db: sqlite_utils.Database) -> int:
    if "migrations" not in db.table_names():
        return 0
    row = db.execute("SELECT max(version) FROM migrations").fetchone()
    return row[0] or 0


def migrate(db: sqlite_utils.Database) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    applied = []
    for version, step in enumerate(MIGRATIONS, start=1):
        if _migrated(db, version):
            continue
        with transaction(db):
            if _migrated(db, version):  # another process migrated meanwhile
                continue
            step(db)
            db.execute(
                "INSERT INTO migrations VALUES (?, ?, ?)", [version, step.__name__, time.time()]
            )
        applied.append(version)
    return applied


def _migrated(db: sqlite_utils.Database, version: int) -> bool:
    """Each version is looked up, not compared with the highest: one recorded as missing (a
    test, an interrupted upgrade) is applied even after later ones."""
    return bool(db.execute("SELECT 1 FROM migrations WHERE version = ?", [version]).fetchone())


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any error (one per indexed file)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def get_meta(db: sqlite_utils.Database, key: str, default: str | None = None) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return row[0] if row else default


def set_meta(db: sqlite_utils.Database, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])


def bump_generation(db: sqlite_utils.Database) -> None:
    """Tell readers (vector cache) that chunks changed; called inside the writing transaction."""
    db.execute(
        "INSERT INTO meta VALUES ('generation', '1') "
        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
    )


def write_fts(db: sqlite_utils.Database, rows: list[tuple[int, str]]) -> None:
    """Add the FTS rows (chunk id, text as fts_text gives it) of chunks that have none."""
    db.conn.executemany("INSERT INTO fts (rowid, text) VALUES (?, ?)", rows)
    if rows and fts_layout(db) == "tf":
        side = tf_rows([text for _, text in rows])
        db.conn.executemany(
            "INSERT INTO fts_tf (rowid, text) VALUES (?, ?)",
            [(cid, tf) for (cid, _), tf in zip(rows, side, strict=True) if tf],
        )


def delete_fts(db: sqlite_utils.Database, ids: list[int]) -> None:
    """Drop the chunks' FTS rows (a chunk without an `fts_tf` row is a no-op there)."""
    db.conn.executemany("DELETE FROM fts WHERE rowid = ?", [(i,) for i in ids])
    if ids and fts_layout(db) == "tf":
        db.conn.executemany("DELETE FROM fts_tf WHERE rowid = ?", [(i,) for i in ids])


def optimize_fts(db: sqlite_utils.Database) -> None:
    """Merge each FTS table's segments into one (smaller and faster to query after a bulk load)."""
    for table in ("fts", "fts_tf") if fts_layout(db) == "tf" else ("fts",):
        db.execute(f"INSERT INTO {table}({table}) VALUES ('optimize')")


def delete_file_chunks(db: sqlite_utils.Database, file_id: int) -> int:
    ids = [r[0] for r in db.execute("SELECT id FROM chunks WHERE file_id = ?", [file_id])]
    if ids:
        delete_fts(db, ids)
        db.execute("DELETE FROM chunks WHERE file_id = ?", [file_id])
    return len(ids)


def mark_stale(db: sqlite_utils.Database, file_id: int, chunk_ids: list[int]) -> None:
    """Drop chunks that have no FTS rows (their file changed, so they cannot be fed) and make
    the next update re-index their file: no recorded size or sha256 matches it."""
    db.conn.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in chunk_ids])
    db.execute("UPDATE files SET size = -1, sha256 = NULL WHERE id = ?", [file_id])


def delete_file(db: sqlite_utils.Database, file_id: int) -> int:
    n = delete_file_chunks(db, file_id)
    db.execute("DELETE FROM files WHERE id = ?", [file_id])
    return n


def insert_chunks(db: sqlite_utils.Database, file_id: int, rows: list[tuple], texts: list[str]):
    """rows: (ord, start_byte, end_byte, start_line, end_line, hash, code) in chunk order."""
    assert len(rows) == len(texts)
    ids = []
    for row in rows:
        cur = db.execute(
            "INSERT INTO chunks (file_id, ord, start_byte, end_byte, start_line, end_line, hash,"
            " code) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [file_id, *row],
        )
        ids.append(cur.lastrowid)
    write_fts(db, list(zip(ids, texts, strict=True)))


def reclaim_free_pages(db: sqlite_utils.Database) -> None:
    """Give the pages freed by deletes back to the file system (auto_vacuum=INCREMENTAL). The
    pragma frees one page per step, so every row it returns must be fetched."""
    db.execute("PRAGMA incremental_vacuum").fetchall()


def disk_bytes(path: Path) -> int:
    """Bytes the index keeps on disk: the database plus its WAL and shared-memory files."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def problems(db: sqlite_utils.Database, code_bytes: int | None) -> list[str]:
    """Everything that breaks the invariants above ([] when the index is consistent)."""
    found = []
    ok = db.execute("PRAGMA integrity_check").fetchone()[0]
    if ok != "ok":
        found.append(f"sqlite integrity_check: {ok}")
    layout = fts_layout(db)
    tables = {"fts": "FTS index", "fts_tf": "FTS repeated-term table"}
    if layout != "tf":
        del tables["fts_tf"]
    for table, name in tables.items():
        try:
            db.execute(f"INSERT INTO {table}({table}, rank) VALUES ('integrity-check', 0)")
        except sqlite3.DatabaseError as e:
            found.append(f"{name} damaged: {e}")
    q = {
        "chunks without an FTS row": "SELECT count(*) FROM chunks "
        "WHERE id NOT IN (SELECT id FROM fts_docsize)",
        "FTS rows without a chunk": "SELECT count(*) FROM fts_docsize "
        "WHERE id NOT IN (SELECT id FROM chunks)",
        "chunks without a file": "SELECT count(*) FROM chunks "
        "WHERE file_id NOT IN (SELECT id FROM files)",
        "skipped files with chunks": "SELECT count(*) FROM chunks WHERE file_id IN "
        "(SELECT id FROM files WHERE skip_reason IS NOT NULL)",
    }
    if "fts_tf_docsize" in db.table_names():
        q["FTS repeated-term rows without a chunk"] = (
            "SELECT count(*) FROM fts_tf_docsize WHERE id NOT IN (SELECT id FROM chunks)"
        )
    if code_bytes is not None:
        q["chunks with a wrong-size vector"] = (
            f"SELECT count(*) FROM chunks WHERE length(code) != {int(code_bytes)}"
        )
    for what, sql in q.items():
        n = db.execute(sql).fetchone()[0]
        if n:
            found.append(f"{n} {what}")
    return found
