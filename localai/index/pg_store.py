"""The PostgreSQL store: the seam (seam.py) over a database that several machines share.

Schema and why each column is there: pg_schema.py. The store keeps no text, as the sqlite one:
passages are re-read from the files on the machine that searches, checked by hash, and a file
that machine lacks reads back as "the file is gone" (readback.py).

Concurrent writers (several `localai index` processes on several machines, one transaction per
file, READ COMMITTED):
- a file's transaction starts with the upsert of its `files` row (unique path), which locks the
  row: a second writer of the same file waits, then replaces the first one's chunks with its own
  (its DELETE runs after the first commit, so it sees them). Unique (file_id, ord) makes a
  duplicate chunk a constraint error, never a silent row;
- every writing transaction takes its locks in one order (the file's row, then the generation
  row in `meta`), so two writers cannot deadlock; the generation row is held only from the
  bump to the commit;
- removal deletes the file's row; its chunks go with it (ON DELETE CASCADE) in the same
  transaction.
Readers take no locks: each query sees only committed files, whole.

Searching is done by the server, so no machine loads every vector: BM25 (bm25.py's formula over
the `terms` tsvector, candidates by its GIN index) and vectors (pgvector: Hamming distance over
`bits` picks RERANK × n candidates, which the codec's codes then rank by approximate cosine, as
the sqlite store ranks all of them).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np

from . import IndexError_
from .bm25 import K1, B, bm25_term, query_terms, term_counts
from .chunker import HASH_BYTES
from .fusion import query_words
from .pg_schema import LOCK_KEY, SCHEMA, migrate
from .seam import ChunkRow, FileRow
from .vectors import CODECS, Codec

TF_CAP = 31  # as the sqlite side table (bm25.TF_BITS) caps a term's count
RERANK = 8  # Hamming candidates per vector hit asked for, ranked again by the codes
MAX_CANDIDATES = 4000
REINDEX_KEY = LOCK_KEY + 1  # the advisory lock held while rebuilding the terms' index
# an HNSW index over `bits`, where a database has one, must still give the LIMIT's candidates
# in distance order: it searches wide and goes on until it has them (pgvector >= 0.8)
OPTIONS = (f"-c search_path={SCHEMA},public -c hnsw.ef_search=1000 "
           "-c hnsw.iterative_scan=strict_order")  # fmt: skip


def shown_uri(uri: str) -> str:
    """The URI without its password, for messages."""
    return re.sub(r"(//[^:/@?]*):[^@/?]*@", r"\1@", uri)


def connect(uri: str):
    """A psycopg connection (autocommit: transactions are explicit) with the schema migrated;
    a missing driver or an unreachable server is an IndexError_ saying what to do."""
    try:
        import psycopg
    except ImportError as e:
        raise IndexError_(
            "index_store names a PostgreSQL database, but its driver is not installed: "
            "pip install 'localai[postgres]'"
        ) from e
    try:
        conn = psycopg.connect(uri, autocommit=True, options=OPTIONS)
        migrate(conn)
    except psycopg.Error as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IndexError_(
            f"cannot use the index at {shown_uri(uri)}: {why}; check index_store (config.toml "
            "or LOCALAI_INDEX_STORE), or start a local server with `localai db start`"
        ) from e
    return conn


def tsvector(counts: dict[str, int]) -> str:
    """A tsvector literal holding each term once, its one position the count (capped). Most
    terms occur once in a chunk: those get no position at all (4 bytes less each), and read
    back as 1."""
    return " ".join("'" + t.replace("\\", "\\\\").replace("'", "''") + "'"
                    + (f":{min(n, TF_CAP)}" if n > 1 else "")
                    for t, n in counts.items())  # fmt: skip


def bits_of(codec: Codec, codes: list[bytes]) -> list[str]:
    """pgvector `bit(384)` values (as '0101…' text) for codes: bin1's signs of the rotated
    decoded vectors, so an exported index and a fresh one hold the same bits."""
    if not codes:
        return []
    mat = np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), codec.nbytes)
    signs = CODECS["bin1"].encode(codec.decode(mat))  # (N, 48)
    return ["".join(map(str, row)) for row in np.unpackbits(signs, axis=1)]


class PgStore:
    kind = "postgresql"

    def __init__(self, uri: str, codec: Codec | None = None):
        self.uri, self.where, self.codec = uri, shown_uri(uri), codec
        self._conn = connect(uri)
        self._depth = 0  # transactions open (nested ones are savepoints)
        self._closed = False
        self._stats: tuple[str, int, float] | None = None  # (generation, chunks, avg length)

    @property
    def conn(self):
        """The connection, a new one if the server dropped the last (a restart, a network cut,
        an administrator's pg_terminate_backend): a daemon or a watcher outlives its server."""
        if self._conn.broken and not self._closed:
            self._conn = connect(self.uri)
            self._stats = None
        return self._conn

    def _exec(self, sql: str, args=()):
        """Run one statement; when the connection turns out dropped and no transaction is open,
        once more on a new one. Every statement this store runs outside a transaction is a read
        or a write that is harmless twice (an upsert, a delete, the generation's bump), and a
        statement on a connection dropped while idle never reached the server anyway."""
        try:
            return self.conn.execute(sql, args)
        except Exception:
            if self._depth or self._closed or not self._conn.broken:
                raise
        return self.conn.execute(sql, args)

    @contextmanager
    def transaction(self):
        if not self._depth:
            self._exec("SELECT 1")  # a dropped connection is replaced now, not inside it
        self._depth += 1
        try:
            with self.conn.transaction():
                yield self
        finally:
            self._depth -= 1

    def writer(self) -> PgStore:
        return PgStore(self.uri, self.codec)

    def close(self) -> None:
        self._closed = True
        self._conn.close()

    def _all(self, sql: str, args=()) -> list[tuple]:
        return self._exec(sql, args).fetchall()

    def _one(self, sql: str, args=()) -> tuple:
        return self._exec(sql, args).fetchone()

    # meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = %s", [key])
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                          "SET value = excluded.value", [key, value])  # fmt: skip

    def setdefault_meta(self, key: str, value: str) -> str:
        self._exec("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                          [key, value])  # fmt: skip
        return self.get_meta(key)

    def bump_generation(self) -> None:
        self._exec("UPDATE meta SET value = (value::bigint + 1)::text "
                          "WHERE key = 'generation'")  # fmt: skip

    def generation(self) -> str:
        return self.get_meta("generation", "0")

    # sources and files --------------------------------------------------------------------

    def add_source(self, path: str) -> None:
        self._exec("INSERT INTO sources VALUES (%s, extract(epoch FROM now())) "
                          "ON CONFLICT DO NOTHING", [path])  # fmt: skip

    def source_paths(self) -> list[str]:
        return [r[0] for r in self._all('SELECT path FROM sources ORDER BY path COLLATE "C"')]

    def delete_source(self, path: str) -> bool:
        return self._exec("DELETE FROM sources WHERE path = %s", [path]).rowcount > 0

    @staticmethod
    def _under(path: str) -> tuple[str, list]:
        """A WHERE clause for files at or under `path`: the exact path, or a range of the
        unique index ('dir/' ≤ path < 'dir0', '0' following '/')."""
        p = path.rstrip("/")
        return "(f.path = %s OR (f.path >= %s AND f.path < %s))", [p, p + "/", p + "0"]

    def counts_under(self, path: str) -> tuple[int, int]:
        where, args = self._under(path)
        return self._one(
            "SELECT count(DISTINCT f.id), count(c.id) FROM files f "
            f"LEFT JOIN chunks c ON c.file_id = f.id WHERE f.skip_reason IS NULL AND {where}",
            args,
        )

    def files_under(self, path: str) -> dict[str, FileRow]:
        where, args = self._under(path)
        rows = self._all("SELECT path, id, size, mtime_ns, sha256, skip_reason FROM files f "
                         f"WHERE {where}", args)  # fmt: skip
        return {r[0]: tuple(r[1:]) for r in rows}

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        self._exec("UPDATE files SET size = %s, mtime_ns = %s WHERE id = %s",
                          [size, mtime_ns, file_id])  # fmt: skip

    def upsert_file(self, path: str, values: list) -> int:
        """values: size, mtime_ns, sha256, loader, text_bytes, skip_reason, indexed_at. Locks
        the file's row until the transaction ends (see the module docstring)."""
        return self._one(
            "INSERT INTO files (path, size, mtime_ns, sha256, loader, text_bytes, skip_reason, "
            "indexed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (path) DO UPDATE "
            "SET size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, "
            "loader = excluded.loader, text_bytes = excluded.text_bytes, "
            "skip_reason = excluded.skip_reason, indexed_at = excluded.indexed_at RETURNING id",
            [path, *values],
        )[0]

    def replace_chunks(self, file_id: int, rows: list[tuple], texts: list[str]) -> None:
        assert len(rows) == len(texts)
        counts = term_counts(texts)
        self.write_chunks(file_id, rows, counts, [sum(c.values()) for c in counts])

    def write_chunks(self, file_id: int, rows: list[tuple], counts: list[dict],
                     lengths: list[int]) -> None:  # fmt: skip
        """The file's chunks become `rows` (ord, start_byte, end_byte, start_line, end_line,
        hash, code), with their BM25 term counts and lengths (an export carries both over)."""
        self._exec("DELETE FROM chunks WHERE file_id = %s", [file_id])
        bits = bits_of(self.codec, [r[6] for r in rows])
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO chunks (file_id, ord, start_byte, end_byte, start_line, end_line, "
                "hash, code, bits, dl, terms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                "%s::bit(384), %s, %s::tsvector)",
                [
                    (file_id, *r, b, n, tsvector(c))
                    for r, b, c, n in zip(rows, bits, counts, lengths, strict=True)
                ],  # fmt: skip
            )

    def delete_file_chunks(self, file_id: int) -> int:
        return self._exec("DELETE FROM chunks WHERE file_id = %s", [file_id]).rowcount

    def delete_file(self, file_id: int) -> int:
        n = self.delete_file_chunks(file_id)
        self._exec("DELETE FROM files WHERE id = %s", [file_id])
        return n

    def known_codes(self, hashes: list[bytes], nbytes: int) -> dict[bytes, bytes]:
        rows = self._all("SELECT hash, code FROM chunks WHERE hash = ANY(%s)",
                         [list(set(hashes))])  # fmt: skip
        return {h: c for h, c in rows if len(c) == nbytes}

    def after_run(self, optimize: bool) -> None:
        """After a bulk load (the indexer's `optimize`, as for sqlite's FTS5 merge), rebuild
        the terms' GIN index: grown one file at a time it is ~3.7x the size of one built in a
        single pass (3.9 MB vs 1.0 MB for 1,980 NFCorpus chunks). CONCURRENTLY, so searches
        and other writers go on; one process at a time (a try-lock: the others skip it).
        Deleted rows' space is autovacuum's to give back."""
        if not optimize:
            return
        got = self._one("SELECT pg_try_advisory_lock(%s)", [REINDEX_KEY])[0]
        if not got:
            return
        try:
            self._exec("REINDEX INDEX CONCURRENTLY chunks_terms")
        finally:
            self._exec("SELECT pg_advisory_unlock(%s)", [REINDEX_KEY])

    def live_files(self) -> list[tuple[int, str]]:
        return self._all("SELECT id, path FROM files WHERE skip_reason IS NULL")

    def file_chunks(self, file_id: int) -> list[tuple[int, bytes]]:
        return self._all("SELECT id, hash FROM chunks WHERE file_id = %s", [file_id])

    def rewrite_fts(self, pairs: list[tuple[int, str]]) -> None:
        counts = term_counts([t for _, t in pairs])
        with self.conn.cursor() as cur:
            cur.executemany("UPDATE chunks SET dl = %s, terms = %s::tsvector WHERE id = %s",
                            [(sum(c.values()), tsvector(c), cid)
                             for (cid, _), c in zip(pairs, counts, strict=True)])  # fmt: skip

    # reporting ----------------------------------------------------------------------------

    def totals(self) -> tuple[int, int, int]:
        f, tb = self._one("SELECT count(*), coalesce(sum(text_bytes), 0) FROM files "
                          "WHERE skip_reason IS NULL")  # fmt: skip
        return f, int(tb), self._one("SELECT count(*) FROM chunks")[0]

    def disk_bytes(self) -> int:
        """Bytes of the index's tables with their indexes and TOAST (the server's own files,
        WAL and catalogs are not the index's)."""
        return int(self._one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
            "AND c.relkind = 'r'", [SCHEMA])[0])  # fmt: skip

    def fts_layout(self) -> str:
        return "tf"  # each term is kept with its count, as in the sqlite layout "tf"

    def problems(self, code_bytes: int | None) -> list[str]:
        q = {
            "skipped files with chunks": "SELECT count(*) FROM chunks WHERE file_id IN "
            "(SELECT id FROM files WHERE skip_reason IS NOT NULL)",
            "chunks without BM25 terms": "SELECT count(*) FROM chunks "
            "WHERE dl > 0 AND length(terms) = 0",
            "chunks with a wrong-length hash": "SELECT count(*) FROM chunks "
            f"WHERE length(hash) != {HASH_BYTES}",
            # a file's chunks are written whole, so their ords are 0..n-1 without a gap
            "files with a gap in their chunks": "SELECT count(*) FROM (SELECT file_id FROM "
            "chunks GROUP BY file_id HAVING max(ord) + 1 != count(*)) t",
        }
        if code_bytes is not None:
            q["chunks with a wrong-size vector"] = (
                f"SELECT count(*) FROM chunks WHERE length(code) != {int(code_bytes)}"
            )
        q["invalid indexes (an interrupted rebuild; DROP INDEX them)"] = (
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{SCHEMA}' "
            "AND NOT i.indisvalid"
        )
        found = []
        for what, sql in q.items():
            n = self._one(sql)[0]
            if n:
                found.append(f"{n} {what}")
        return found

    # searching ----------------------------------------------------------------------------

    def _chunk_stats(self) -> tuple[int, float]:
        """(chunks, their average length), read once per generation."""
        gen = self.generation()
        if self._stats is None or self._stats[0] != gen:
            n, avg = self._one("SELECT count(*), coalesce(avg(dl), 0) FROM chunks")
            self._stats = (gen, n, float(avg))
        return self._stats[1], self._stats[2]

    def bm25(self, query: str, n: int) -> list[int]:
        """bm25.Scorer's ranking: the same terms, counts, lengths and formula."""
        terms = [t for _, t in query_terms(query_words(query))]
        total, avgdl = self._chunk_stats()
        if not terms or not total:
            return []
        tsq = " | ".join("'" + t.replace("\\", "\\\\").replace("'", "''") + "'" for t in terms)
        rows = self._all(
            "SELECT c.id, c.dl, u.lexeme, coalesce(u.positions[1], 1) "
            "FROM chunks c, unnest(c.terms) u "
            "WHERE c.terms @@ %s::tsquery AND u.lexeme = ANY(%s)",
            [tsq, terms],
        )
        if not rows:
            return []
        ids = np.array([r[0] for r in rows], np.int64)
        dl = np.array([r[1] for r in rows], np.float64)
        tf = np.array([r[3] for r in rows], np.float64)
        lex = np.array([r[2] for r in rows], object)
        part = np.zeros(len(rows))
        for t in set(lex):
            m = lex == t
            norm = K1 * (1 - B + B * dl[m] / max(avgdl, 1e-9))
            part[m] = bm25_term(tf[m], int(m.sum()), total, norm)
        uniq, inv = np.unique(ids, return_inverse=True)
        score = np.bincount(inv, weights=part)
        order = np.lexsort((uniq, -score))[:n]  # best first; ties: the smaller id
        return uniq[order].tolist()

    def nearest(self, query: np.ndarray, n: int) -> list[int]:
        q = query.astype(np.float32)
        qbits = "".join(map(str, np.unpackbits(CODECS["bin1"].encode(q[None]))))
        rows = self._all("SELECT id, code FROM chunks ORDER BY bits <~> %s::bit(384) LIMIT %s",
                         [qbits, min(max(RERANK * n, 400), MAX_CANDIDATES)])  # fmt: skip
        if not rows:
            return []
        ids = np.array([r[0] for r in rows], np.int64)
        codes = np.frombuffer(b"".join(r[1] for r in rows), np.uint8)
        scores = self.codec.scores(codes.reshape(len(rows), self.codec.nbytes), q)  # (M,)
        order = np.lexsort((ids, -scores))[:n]
        return ids[order].tolist()

    def drop_caches(self) -> int:
        self._stats = None
        return 0

    def chunk_rows(self, ids: set[int]) -> dict[int, ChunkRow]:
        rows = self._all(
            "SELECT c.id, c.file_id, f.path, c.start_byte, c.end_byte, c.start_line, "
            "c.end_line, c.hash FROM chunks c JOIN files f ON f.id = c.file_id "
            "WHERE c.id = ANY(%s)",
            [list(ids)],
        )
        return {r[0]: r for r in rows}
