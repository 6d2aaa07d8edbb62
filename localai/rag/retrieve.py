"""Stage 1: the question → the best passages, re-read from their files.

Hybrid search (BM25 + vectors, fused) over the index; each hit is re-read and checked against
its indexed hash, and stale passages (the file changed since indexing) are dropped and counted,
never given to the model as if they were current.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..index.facade import Index
from ..index.paths import user_path
from ..index.readback import Passage
from ..index.search import Hit


@dataclass
class Source:
    rank: int  # 1 = best retrieval score
    hit: Hit
    passage: Passage

    @property
    def where(self) -> str:
        return self.passage.where


@dataclass
class Retrieved:
    sources: list[Source] = field(default_factory=list)
    stale: int = 0  # hits dropped because their file changed or is gone


def _under(path: str, root: Path) -> bool:
    p = Path(path)
    return p == root or root in p.parents


def retrieve(index: Index, question: str, k: int, source: str | Path | None = None) -> Retrieved:
    """Up to `k` fresh passages for `question`, best first (only under `source`, if given)."""
    root = user_path(source, "source") if source else None
    depth = k * 5 if root else k  # filtering by folder happens after ranking
    hits = index.search(question, k=depth)
    if root is not None:
        hits = [h for h in hits if _under(h.path, root)][:k]
    out = Retrieved()
    for hit, passage in zip(hits, index.read_many(hits), strict=True):
        if passage.verified and passage.text.strip():
            out.sources.append(Source(len(out.sources) + 1, hit, passage))
        else:
            out.stale += 1
    return out
