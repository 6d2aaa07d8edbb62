"""The store seam: what the index's stages (indexer, searcher, facade) ask of the database.

Two stores meet it: `SqliteStore` (sqlite_store.py; one file under the home, the default) and
`PgStore` (pg_store.py; a PostgreSQL database that several machines share). The stages hold
no SQL of their own; they call these methods, so a store is chosen once, in `open_store`, and
nothing downstream asks which one it has.

Contract every store keeps (the invariants of store.py, in its own terms):
- one `transaction()` per indexed file: a file's row and all its chunks (with their BM25 terms
  and vector codes) are written, or none are;
- the store never holds document text: chunks point into their files and carry a content hash;
- `bm25` ranks exactly as bm25.Scorer does (FTS5's bm25() formula over FTS5's terms), and
  `nearest` ranks by the codec's approximate cosine, so both stores give the same hits;
- `generation()` moves with every committed change of chunks (readers' caches key on it).

Chunk rows handed to `replace_chunks`: (ord, start_byte, end_byte, start_line, end_line, hash,
code) in chunk order, with each chunk's FTS text (fusion.fts_text) beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import numpy as np

from .vectors import Codec

# (id, file_id, path, start_byte, end_byte, start_line, end_line, hash): what a Hit is made of
ChunkRow = tuple[int, int, str, int, int, int, int, bytes]
# path → (id, size, mtime_ns, sha256, skip_reason): a file as the indexer last recorded it
FileRow = tuple[int, int, int, bytes | None, str | None]


class Store(Protocol):
    where: str  # how messages name the store (a file path, or a URI without its password)
    kind: str  # "sqlite" | "postgresql"
    codec: Codec | None  # the index's vector codec, set by the facade once meta names it

    def transaction(self) -> AbstractContextManager: ...
    def writer(self) -> Store: ...  # a second connection, so searches go on while it writes
    def close(self) -> None: ...

    def get_meta(self, key: str, default: str | None = None) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def setdefault_meta(self, key: str, value: str) -> str: ...  # the value recorded first
    def bump_generation(self) -> None: ...
    def generation(self) -> str: ...

    def add_source(self, path: str) -> None: ...
    def source_paths(self) -> list[str]: ...
    def delete_source(self, path: str) -> bool: ...  # False: it was not a source
    def counts_under(self, path: str) -> tuple[int, int]: ...  # (files, chunks) indexed there

    def files_under(self, path: str) -> dict[str, FileRow]: ...
    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None: ...
    def upsert_file(self, path: str, values: list) -> int: ...
    def replace_chunks(self, file_id: int, rows: list[tuple], texts: list[str]) -> None: ...
    def delete_file_chunks(self, file_id: int) -> int: ...
    def delete_file(self, file_id: int) -> int: ...
    def known_codes(self, hashes: list[bytes], nbytes: int) -> dict[bytes, bytes]: ...
    def after_run(self, optimize: bool) -> None: ...  # compact what a run left behind
    def live_files(self) -> list[tuple[int, str]]: ...  # (id, path) of files with chunks
    def file_chunks(self, file_id: int) -> list[tuple[int, bytes]]: ...  # (chunk id, hash)
    def rewrite_fts(self, pairs: list[tuple[int, str]]) -> None: ...  # (chunk id, FTS text)

    def totals(self) -> tuple[int, int, int]: ...  # (files, text_bytes, chunks)
    def disk_bytes(self) -> int: ...
    def fts_layout(self) -> str: ...
    def problems(self, code_bytes: int | None) -> list[str]: ...

    def bm25(self, query: str, n: int) -> list[int]: ...
    def nearest(self, query: np.ndarray, n: int) -> list[int]: ...
    def chunk_rows(self, ids: set[int]) -> dict[int, ChunkRow]: ...
    def drop_caches(self) -> int: ...  # bytes freed


def is_pg_uri(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def open_store(home: Path, index_store: str,
               on_vectors: Callable[[int], None] | None = None) -> Store:  # fmt: skip
    """The configured store: a PostgreSQL URI, else the sqlite file under `home`."""
    if is_pg_uri(index_store):
        from .pg_store import PgStore

        return PgStore(index_store)
    from .sqlite_store import SqliteStore

    return SqliteStore(home / "index.db", on_vectors)


def chunked(items: list, size: int = 500) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
