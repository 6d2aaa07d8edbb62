"""Reading passages back: a hit → the text its file holds now, checked against the indexed hash.

The index keeps no copy of the text, so every passage shown (search results, RAG prompts,
citations) is re-read from its file, re-chunked the way it was indexed, and matched by content
hash. The file is read with the walk's rules (`walk.read_indexable`): only a regular file within
the size limit, with a bounded read that never blocks, so a file that became a FIFO, a device or
a huge file after it was indexed gives an unverified passage with the reason, never a stall.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..terminal import shown
from .chunker import Chunk, chunk
from .loaders import Unreadable, load, loader_for
from .walk import MAX_FILE_BYTES, NotIndexable, read_indexable

if TYPE_CHECKING:
    from .search import Hit

READ_CACHE = 32  # re-chunked files kept for read-back


@dataclass(frozen=True)
class Passage:
    text: str
    verified: bool
    reason: str  # "" when verified
    path: str
    start_line: int
    end_line: int
    pages: tuple[int, int] | None = None  # for paged documents (PDF)

    @property
    def where(self) -> str:
        return location(self.path, self.start_line, self.end_line, self.pages)


def location(path: str, start_line: int, end_line: int, pages=None) -> str:
    """`path:lines`, or `path p.N` (`p.N-M`) for a paged document: what is shown to people
    (and to the model), so the name's control characters are escaped."""
    path = shown(path)
    if pages:
        a, b = pages
        return f"{path} p.{a}" + (f"-{b}" if b != a else "")
    return f"{path}:{start_line}-{end_line}"


Rechunked = tuple[bytes, list[Chunk]] | str  # (text bytes, chunks), or why the file gave none


class Reader:
    """Re-reads and re-chunks files for read-back, keeping the last READ_CACHE files."""

    def __init__(self, count_tokens: Callable[[list[str]], list[int]],
                 max_bytes: int = MAX_FILE_BYTES):  # fmt: skip
        self.count_tokens, self.max_bytes = count_tokens, max_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, tuple[bytes, list]] = OrderedDict()

    def nbytes(self) -> int:
        """Text bytes of the files kept for read-back (their chunk lists add a little more)."""
        with self._lock:
            return sum(len(v[0]) for v in self._cache.values())

    def clear(self) -> int:
        """Forget the kept files; the bytes freed."""
        with self._lock:
            freed = sum(len(v[0]) for v in self._cache.values())
            self._cache.clear()
        return freed

    def read_many(self, hits: list[Hit]) -> list[Passage]:
        chunks_of: dict[str, Rechunked] = {}
        out = []
        for h in hits:
            if h.path not in chunks_of:
                chunks_of[h.path] = self.rechunk(Path(h.path))
            out.append(_passage(h, chunks_of[h.path]))
        return out

    def rechunk(self, path: Path) -> Rechunked:
        """The file's current text bytes (a derived Document's, for PDFs) and chunks.
        Re-chunking a large HTML page costs ~0.1–1 s, so the last READ_CACHE files are kept,
        keyed by (size, mtime_ns): any write to the file changes the key, and a changed file
        is never served from the cache."""
        try:
            st = path.stat()
        except OSError:
            st = None
        key = (str(path), st.st_size, st.st_mtime_ns) if st else None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            data = read_indexable(path, self.max_bytes)
        except NotIndexable as e:
            gone = isinstance(e.__cause__, FileNotFoundError)
            return str(e) if gone else f"the file cannot be read back: {e}"
        got = self._chunks(path, data)
        if st is not None and len(data) == st.st_size:  # not written to while we read it
            with self._lock:
                self._cache[key] = got
                while len(self._cache) > READ_CACHE:
                    self._cache.popitem(last=False)
        return got

    def _chunks(self, path: Path, data: bytes) -> tuple[bytes, list[Chunk]]:
        picked = loader_for(path, data[:4096])
        if picked is not None:
            try:
                blocks, text, paged = load(picked[1], data, path)
                return text, chunk(blocks, text, self.count_tokens, paged)
            except Unreadable:  # unreadable now: no chunk can match
                pass
        return data, []


def _passage(h: Hit, got: Rechunked) -> Passage:
    if isinstance(got, str):
        return Passage("", False, got, h.path, h.start_line, h.end_line)
    data, chunks = got
    want = bytes.fromhex(h.hash)
    same = [c for c in chunks if c.hash == want]
    if same:
        c = min(same, key=lambda c: abs(c.start_byte - h.start_byte))
        moved = "" if c.start_byte == h.start_byte else "moved within the file since indexing"
        return Passage(c.text, True, moved, h.path, c.start_line, c.end_line, c.pages)
    text = data[h.start_byte : h.end_byte].decode("utf-8", errors="replace")
    why = "the file changed since it was indexed (run `localai index` to refresh)"
    return Passage(text, False, why, h.path, h.start_line, h.end_line)
