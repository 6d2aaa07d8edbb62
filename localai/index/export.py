"""Moving a sqlite index into PostgreSQL (`localai index --export postgresql://…`).

Nothing is re-embedded and no file is re-read: sources, files and chunks are copied with their
hashes and vector codes byte for byte, and each chunk's BM25 terms with their counts are read
back out of the sqlite FTS tables themselves (fts5vocab's `instance` view lists each chunk's
terms; in layout "tf" the side table's `term=b` marks give the counts, as bm25.Scorer reads
them; in the older layout "full" each occurrence is one row). Chunk lengths come from
`fts_docsize`. The PostgreSQL index then ranks exactly as the sqlite one did.

Files are copied in batches, one transaction each, so an interrupted export leaves whole files;
running it again skips the files the database already holds with the same content (sha256), and
replaces those it holds with other content. The database must be empty or hold an index of the
same codec and embedding model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from . import IndexError_, store
from .bm25 import TF_BITS, docsize_lengths
from .pg_store import PgStore
from .seam import chunked

BATCH = 1000  # files per transaction (each batch scans the FTS vocabulary once)


def export(src, dest: PgStore, progress: Callable[[int, int], None] | None = None) -> dict:
    """Copy the sqlite index `src` (a SqliteStore) into `dest`; returns counts copied."""
    for key in ("codec", "embed_model"):
        have, want = dest.get_meta(key), src.get_meta(key)
        if have is not None and have != want:
            raise IndexError_(
                f"{dest.where} holds an index with {key} {have}, this one has {want}; nothing "
                "was exported (use an empty database)"
            )
    with dest.transaction():
        for key in ("codec", "embed_model"):
            dest.set_meta(key, src.get_meta(key))
        for path in src.source_paths():
            dest.add_source(path)
    db = src.db
    files = db.execute("SELECT id, path, size, mtime_ns, sha256, loader, text_bytes, "
                       "skip_reason, indexed_at FROM files ORDER BY id").fetchall()  # fmt: skip
    have = {p: r[3] for p, r in dest.files_under("/").items()}
    todo = [f for f in files if have.get(f[1], b"") != f[4] or f[4] is None]
    out = {"files": 0, "chunks": 0, "skipped_same": len(files) - len(todo)}
    for part in chunked(todo, BATCH):
        out["chunks"] += _copy(db, dest, part)
        out["files"] += len(part)
        if progress:
            progress(out["files"], len(todo))
    return out


def _copy(db, dest: PgStore, files: list[tuple]) -> int:
    """One transaction: these files' rows and chunks, replacing what dest held for them."""
    fids = [f[0] for f in files]
    marks = ",".join("?" * len(fids))
    chunks = db.execute(
        "SELECT id, file_id, ord, start_byte, end_byte, start_line, end_line, hash, code "
        f"FROM chunks WHERE file_id IN ({marks}) ORDER BY file_id, ord",
        fids,
    ).fetchall()
    counts, lengths = _terms(db, [c[0] for c in chunks])
    by_file = defaultdict(list)
    for c in chunks:
        by_file[c[1]].append(c)
    with dest.transaction():
        for fid, path, *values in files:
            new_id = dest.upsert_file(path, values)
            rows = by_file.get(fid, [])
            dest.write_chunks(new_id, [r[2:9] for r in rows], [counts.get(r[0], {}) for r in rows],
                              [lengths.get(r[0], 0) for r in rows])  # fmt: skip
        dest.bump_generation()
    return len(chunks)


def _terms(db, ids: list[int]) -> tuple[dict[int, dict[str, int]], dict[int, int]]:
    """Each chunk's FTS5 terms with their counts, and its length, from the FTS tables."""
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    lengths: dict[int, int] = {}
    tf = store.fts_layout(db) == "tf"
    db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.v_fts USING fts5vocab(main, fts, instance)")
    if tf:
        db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.v_tf "
                   "USING fts5vocab(main, fts_tf, instance)")  # fmt: skip
    for part in chunked(ids):
        marks = ",".join("?" * len(part))
        for term, doc in db.execute(f"SELECT term, doc FROM v_fts WHERE doc IN ({marks})", part):
            counts[doc][term] = counts[doc].get(term, 0) + (0 if tf else 1)
        if tf:
            for mark, doc in db.execute(f"SELECT term, doc FROM v_tf WHERE doc IN ({marks})",
                                        part):  # fmt: skip
                term, b = mark.rsplit("=", 1)
                assert int(b) in TF_BITS, mark
                counts[doc][term] = counts[doc].get(term, 0) + int(b)
            for doc in (d for d in part if d in counts):  # not in the side table: once
                counts[doc] = {t: n or 1 for t, n in counts[doc].items()}
        rows = db.execute(f"SELECT id, sz FROM fts_docsize WHERE id IN ({marks})", part)
        rows = rows.fetchall()
        lens = docsize_lengths([r[1] for r in rows])
        lengths.update(zip((r[0] for r in rows), lens.tolist(), strict=True))
    return counts, lengths
