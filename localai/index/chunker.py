"""Chunker: loader blocks → chunks of about 200–250 embedder tokens, with byte and line ranges.

Structure first: a heading starts a new chunk once the current one holds at least MIN_TOKENS, so
sections stay together; paragraphs and code blocks are packed whole while they fit; a block too
big for one chunk is split at lines, then sentences, then words. When a section is cut only for
size, the next chunk repeats the previous piece if it is short (OVERLAP_TOKENS), so a sentence at
the seam is seen whole once.

Every chunk's text is its pieces joined by a blank line; its hash is the first HASH_BYTES bytes
of blake2b-128 of that text (a prefix, so indexes from when all 16 were kept shorten theirs).
Chunking is deterministic: the same file gives the same chunks, which is how the index reads a
chunk back (re-chunk the file, find the hash) without keeping a copy of the text.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from .blocks import Block, ByteOffsets

MAX_TOKENS = 250  # + [CLS] [SEP] stays inside MiniLM's 256
MIN_TOKENS = 100
OVERLAP_TOKENS = 40
# 64 bits: two different chunks of a 10M-chunk index share a hash with probability ~3e-6
HASH_BYTES = 8
Counter = Callable[[list[str]], list[int]]  # texts → token counts without special tokens


@dataclass(frozen=True)
class Chunk:
    text: str
    start_byte: int
    end_byte: int
    start_line: int  # 1-based, inclusive
    end_line: int
    hash: bytes
    tokens: int
    pages: tuple[int, int] | None = None  # first and last page, for paged documents (PDF)


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()[:HASH_BYTES]


@dataclass
class _Piece:
    text: str
    start: int
    end: int
    kind: str
    tokens: int


_SPLITTERS = [re.compile(r"\n"), re.compile(r"(?<=[.!?;:])\s+"), re.compile(r"\s+")]


def _split(text: str, start: int, end: int, exact: bool, kind: str, count: Counter,
           level: int = 0) -> list[_Piece]:  # fmt: skip
    """Cut one oversized block into pieces of at most MAX_TOKENS, keeping byte offsets."""
    if level >= len(_SPLITTERS):  # one "word" longer than a chunk: cut by characters
        units = [(i, min(i + 400, len(text))) for i in range(0, len(text), 400)]
    else:
        units, pos = [], 0
        for m in _SPLITTERS[level].finditer(text):
            if m.start() > pos:
                units.append((pos, m.start()))
            pos = m.end()
        if pos < len(text):
            units.append((pos, len(text)))
    to_byte = ByteOffsets(text)

    def piece(a: int, b: int, n: int) -> _Piece:
        if exact:
            return _Piece(text[a:b], start + to_byte(a), start + to_byte(b), kind, n)
        return _Piece(text[a:b], start, end, kind, n)

    counts = count([text[a:b] for a, b in units])
    out: list[_Piece] = []
    cur: tuple[int, int, int] | None = None  # (char start, char end, tokens)
    for (a, b), n in zip(units, counts, strict=True):
        if n > MAX_TOKENS:
            if cur:
                out.append(piece(*cur))
                cur = None
            sub = _split(text[a:b], 0, 0, True, kind, count, level + 1)
            for p in sub:  # sub-pieces were cut from text[a:b]; shift their offsets
                if exact:
                    base = start + to_byte(a)
                    p = _Piece(p.text, base + p.start, base + p.end, kind, p.tokens)
                else:
                    p = _Piece(p.text, start, end, kind, p.tokens)
                out.append(p)
        elif cur and cur[2] + n + 1 <= MAX_TOKENS:
            cur = (cur[0], b, cur[2] + n + 1)
        else:
            if cur:
                out.append(piece(*cur))
            cur = (a, b, n)
    if cur:
        out.append(piece(*cur))
    return out


def _pieces(blocks: list[Block], count: Counter) -> list[_Piece]:
    counts = count([b.text for b in blocks])
    out = []
    for b, n in zip(blocks, counts, strict=True):
        if n <= MAX_TOKENS:
            out.append(_Piece(b.text, b.start, b.end, b.kind, n))
        else:
            out.extend(_split(b.text, b.start, b.end, b.exact, b.kind, count))
    return out


def _groups(pieces: list[_Piece]) -> list[list[_Piece]]:
    """Greedy packing with heading breaks and a short overlap at size-only breaks."""
    groups: list[list[_Piece]] = []
    cur: list[_Piece] = []
    size = 0
    for p in pieces:
        heading_break = p.kind == "heading" and size >= MIN_TOKENS
        if cur and (heading_break or size + p.tokens + 1 > MAX_TOKENS):
            groups.append(cur)
            last = cur[-1]
            carry = (
                not heading_break
                and last.kind != "heading"
                and last.tokens <= OVERLAP_TOKENS
                and last.tokens + p.tokens + 1 <= MAX_TOKENS
            )
            cur = [last] if carry else []
            size = last.tokens + 1 if carry else 0
        cur.append(p)
        size += p.tokens + 1
    if cur:
        groups.append(cur)
    return groups


def chunk(blocks: list[Block], data: bytes, count: Counter, paged: bool = False) -> list[Chunk]:
    """Chunks of a file whose loader gave `blocks` for its bytes `data` (for a Document, its
    derived text; `paged`: form feeds separate pages)."""
    newlines = [m.start() for m in re.finditer(b"\n", data)]
    breaks = [m.start() for m in re.finditer(b"\f", data)] if paged else []
    out = []
    for group in _groups(_pieces(blocks, count)):
        text = "\n\n".join(p.text for p in group)
        s = min(p.start for p in group)
        e = max(p.end for p in group)
        first = bisect.bisect_left(newlines, s) + 1
        last = bisect.bisect_left(newlines, max(s, e - 1)) + 1
        tokens = sum(p.tokens for p in group) + len(group) - 1
        pages = None
        if paged:
            pages = (bisect.bisect_left(breaks, s) + 1, bisect.bisect_left(breaks, e - 1) + 1)
        out.append(Chunk(text, s, e, first, last, content_hash(text), tokens, pages))
    return out
