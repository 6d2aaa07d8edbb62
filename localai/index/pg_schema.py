"""The PostgreSQL index's schema: numbered migrations in the `localai` schema of the database.

As in store.py, `MIGRATIONS[i]` is version i + 1, applied in its own transaction and recorded in
`localai.migrations`. Processes that open the same database at once (several machines, several
indexers) take one advisory lock for the whole migration, so each version runs exactly once.

What the tables hold, and why:
- `files.path` is `COLLATE "C"`: "files under this folder" is then a range of the unique index
  (path >= 'dir/' AND path < 'dir0'), byte order, whatever the database's locale;
- `chunks.terms` is a tsvector of the chunk's FTS5 terms (bm25.term_counts: the same porter
  stemmer and unicode61 folding as the sqlite index), a repeated one with one position whose
  value is the term's count in the chunk, capped at 31 as the sqlite side table caps it (a term
  without a position occurs once). PostgreSQL's own
  parser and ts_rank are not used: bm25() over FTS5's terms is what the index ranks by, and a
  GIN index over the tsvector finds the chunks holding a term. `dl` is the chunk's token count;
- `chunks.code` is the codec's vector code, byte for byte what the sqlite index holds (export
  copies it, incremental update reuses it by hash); `chunks.bits` is pgvector's compact `bit`
  type: the signs of the rotated vector (the bin1 code, 48 bytes), whose Hamming distance
  (`<~>`) picks candidates that the codes then rank (pg_store.nearest), through an HNSW index
  (version 2, pgvector >= 0.7: at 100k chunks 24 ms a query against 82 for the exact scan,
  BENCHMARKS.md; searched wide enough to keep the exact scan's candidates, pg_store.OPTIONS);
- unique (file_id, ord) and unique path: two writers can never give one file two sets of
  chunks; ON DELETE CASCADE drops a file's chunks with its row.
"""

from __future__ import annotations

import time
from collections.abc import Callable

SCHEMA = "localai"
LOCK_KEY = 0x6C6F63616C6169  # "localai": the advisory lock taken while migrating


def _m1_base(cur) -> None:
    cur.execute("CREATE TABLE meta (key text PRIMARY KEY, value text)")
    cur.execute("CREATE TABLE sources (path text PRIMARY KEY, added_at double precision NOT NULL)")
    cur.execute(
        """CREATE TABLE files (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            path text COLLATE "C" NOT NULL UNIQUE,
            size bigint NOT NULL,
            mtime_ns bigint NOT NULL,
            sha256 bytea,
            loader text,
            text_bytes bigint NOT NULL DEFAULT 0,
            skip_reason text,
            indexed_at double precision NOT NULL)"""
    )
    # identity, never reused: a stale id held by a reader cannot point at another chunk
    cur.execute(
        """CREATE TABLE chunks (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            file_id bigint NOT NULL REFERENCES files(id) ON DELETE CASCADE,
            ord integer NOT NULL,
            start_byte integer NOT NULL,
            end_byte integer NOT NULL,
            start_line integer NOT NULL,
            end_line integer NOT NULL,
            hash bytea NOT NULL,
            code bytea NOT NULL,
            bits bit(384) NOT NULL,
            dl integer NOT NULL,
            terms tsvector NOT NULL,
            UNIQUE (file_id, ord))"""
    )
    cur.execute("CREATE INDEX chunks_hash ON chunks (hash)")
    cur.execute("CREATE INDEX chunks_terms ON chunks USING gin (terms)")
    cur.execute("INSERT INTO meta VALUES ('generation', '0')")


def _m2_bits_hnsw(cur) -> None:
    cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    major, minor = (int(x) for x in cur.fetchone()[0].split(".")[:2])
    if (major, minor) >= (0, 7):  # older ones have no HNSW over bit: the exact scan stays
        cur.execute("CREATE INDEX chunks_bits ON chunks USING hnsw (bits bit_hamming_ops)")


MIGRATIONS: list[Callable] = [_m1_base, _m2_bits_hnsw]


def migrate(conn) -> list[int]:
    """Create the schema (and the vector extension) if needed and apply the migrations this
    database lacks; returns the versions applied."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_KEY])
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at double precision NOT NULL)"
        )
        done = {r[0] for r in conn.execute(f"SELECT version FROM {SCHEMA}.migrations")}
        for version, step in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            with conn.transaction(), conn.cursor() as cur:  # a savepoint per version
                step(cur)
                cur.execute(f"INSERT INTO {SCHEMA}.migrations VALUES (%s, %s, %s)",
                            [version, step.__name__, time.time()])  # fmt: skip
            applied.append(version)
    return applied


def schema_version(conn) -> int:
    row = conn.execute(f"SELECT max(version) FROM {SCHEMA}.migrations").fetchone()
    return row[0] or 0
