"""Searching: a query → the best chunks (or files) of the index, as Hits.

Two ranked lists, each CANDIDATES deep (deeper under a folder filter, which thins them): BM25
(bm25.py's ranking, which either store reproduces) and the nearest vector codes (vectors.py),
optionally re-scored by exact cosine from embeddings recomputed from the files' text. Hybrid mode
fuses them by reciprocal rank (fusion.py). The store (seam.py) makes each list.

The Searcher shares the facade's store and lock; what a store caches for searching is rebuilt
when the index's generation moves (any write, in this process or another). Embedding
(the query, and the candidates when re-scoring) runs outside the lock, so other searches do
not wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import MODES, UNITS, IndexError_
from .fusion import rrf, to_files
from .paths import normal_path
from .readback import Passage
from .seam import Store

CANDIDATES = 100  # each list's depth before fusion


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


def hit_row(h: Hit, p: Passage) -> dict:
    """A hit and its passage as one JSON object (`localai search --json`, POST /localai/search)."""
    return {**asdict(h), "text": p.text, "verified": p.verified, "reason": p.reason,
            "pages": p.pages, "where": p.where}  # fmt: skip


class Searcher:
    """Ranks the chunks of one index through its store (seam.py). `embed(texts)` → unit vectors
    (called only for vector search); `read_many(hits)` re-reads passages (for re-scoring)."""

    def __init__(self, db: Store, lock: threading.RLock,
                 embed: Callable[[list[str]], np.ndarray],
                 read_many: Callable[[list[Hit]], list[Passage]]):  # fmt: skip
        self.db, self._lock = db, lock
        self.embed, self.read_many = embed, read_many

    def drop_vectors(self) -> int:
        """Forget what the store keeps in RAM for searching; the bytes freed."""
        with self._lock:
            return self.db.drop_caches()

    def bm25_chunks(self, query: str, n: int = CANDIDATES) -> list[int]:
        with self._lock:
            return self.db.bm25(query, n)

    def vector_chunks(self, query: str | np.ndarray, n: int = CANDIDATES,
                      rescore: int = 0) -> list[int]:  # fmt: skip
        """The n nearest chunk ids, the first `rescore` of them re-scored (see _rescored).
        Embedding runs outside the index lock, so other searches do not wait for it."""
        qv = self.embed([query])[0] if isinstance(query, str) else query
        with self._lock:
            ids = self.db.nearest(qv, n)
        depth = min(rescore, len(ids))
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
        exact = self.embed([t for _, t in fresh]) @ qv.astype(np.float32)
        order = [fresh[i][0] for i in np.argsort(-exact, kind="stable")]
        done = set(order)
        return order + [c for c in ids if c not in done]

    def search(self, query: str, k: int = 10, unit: str = "chunk", mode: str = "hybrid",
               under: str | Path | None = None, rescore: int = 0) -> list[Hit]:  # fmt: skip
        """Best `k` chunks (or files) for `query`; `under` keeps only files in that folder."""
        if unit not in UNITS:
            raise IndexError_(f"unit must be one of {UNITS}, not {unit!r}")
        if mode not in MODES:
            raise IndexError_(f"mode must be one of {MODES}, not {mode!r}")
        if k < 1:
            raise IndexError_(f"k must be at least 1, not {k}")
        depth = max(CANDIDATES, 3 * k) * (10 if under else 1)  # a folder filter thins lists
        prefix = str(normal_path(under, "under")).rstrip("/") + "/" if under else None
        lists = []
        if mode in ("hybrid", "bm25"):
            lists.append(self.bm25_chunks(query, depth))
        if mode in ("hybrid", "vector"):
            lists.append(self.vector_chunks(query, depth, rescore))
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
        return self.db.chunk_rows(ids)


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
