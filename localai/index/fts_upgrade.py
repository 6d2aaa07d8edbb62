"""Re-feeding FTS from the files: after a change to what FTS is fed (`refeed`), and the upgrade
of an older index's FTS (layout "full") to the current, smaller layout "tf" (`upgrade`).

The index keeps no copy of the text, so both re-read every file and re-chunk it the way it was
indexed (readback.Reader); a chunk is fed only when its file still holds it (same content hash).
"""

from __future__ import annotations

import threading
from pathlib import Path

from . import store
from .fusion import fts_text
from .readback import Reader
from .seam import Store


def fed_texts(reader: Reader, path: Path) -> dict[bytes, str]:
    """What FTS receives for each chunk the file holds now, by content hash ({} if it is gone or
    unreadable)."""
    got = reader.rechunk(path)
    return {} if isinstance(got, str) else {c.hash: fts_text(c.text) for c in got[1]}


def refeed(db: Store, lock: threading.RLock, reader: Reader) -> int:
    """Rewrite every chunk's FTS rows from its file, one transaction per file; chunks whose file
    changed are left for the next update. Returns chunks rewritten."""
    n = 0
    for fid, path in db.live_files():
        fed = fed_texts(reader, Path(path))
        pairs = [(cid, fed[h]) for cid, h in db.file_chunks(fid) if h in fed]
        with lock, db.transaction():
            db.rewrite_fts(pairs)
            db.bump_generation()  # chunk lengths may have changed
        n += len(pairs)
    db.after_run(optimize=False)
    return n


def upgrade(db, lock: threading.RLock, reader: Reader) -> dict:
    """Rebuild layout "full" as "tf", from the files; nothing to do on a current index. The files
    are read first; then one transaction swaps the tables, so searches see the old layout until
    the new one is complete, and other writers wait. A chunk whose file changed since it was
    indexed cannot be fed: it is dropped and its file marked for the next `update()` (which
    finds its unchanged chunks' vectors by content hash). Returns {"chunks", "stale_files"}."""
    if store.fts_layout(db) == "tf":
        return {"chunks": 0, "stale_files": 0}
    files = db.execute("SELECT id, path FROM files WHERE skip_reason IS NULL").fetchall()
    fed = {fid: fed_texts(reader, Path(path)) for fid, path in files}
    n, stale = 0, 0
    with lock, store.transaction(db):
        store.replace_fts(db)
        for fid, texts in fed.items():
            rows = db.execute("SELECT id, hash FROM chunks WHERE file_id = ?", [fid]).fetchall()
            pairs = [(cid, texts[h]) for cid, h in rows if h in texts]
            store.write_fts(db, pairs)
            n += len(pairs)
            if len(pairs) < len(rows):
                store.mark_stale(db, fid, [cid for cid, h in rows if h not in texts])
                stale += 1
        store.optimize_fts(db)
        store.bump_generation(db)
    store.reclaim_free_pages(db)  # the old table's pages go back to the disk
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {"chunks": n, "stale_files": stale}
