"""Stage 2a: shorten each passage to its best sentences before packing.

Prefill is most of the time to the first token on a laptop CPU (~60 prompt tokens/s for the
default model on 2 cores), and most of an indexed chunk is not what the question asked. So a
passage longer than the model's budget (catalog `rag_passage_tokens`) keeps the sentence that
shares most words with the question and grows around it, a sentence after then one before,
while the budget lasts. The kept text is one contiguous span of the passage, byte for byte, so
a quote from it is a quote from the file: citation checks (cite.py) re-read the whole chunk
and are unchanged. BENCHMARKS.md ("RAG time to first token") has the budget's measurements.

The span depends on the question only through its closest sentence; and when an earlier question
read a span of the same passage that holds this question's closest sentence and fits the budget,
that span is read again (Spans): its KV is kept (engine/pieces.py), so it costs nothing to
compute, where a span shifted by one sentence would cost all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ..private import write_private
from .cite import words
from .retrieve import Source

_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")  # cite.SENTENCE: the checker's idea of a sentence


def spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each non-empty sentence of `text`."""
    out, at = [], 0
    for m in _BREAK.finditer(text):
        if text[at : m.start()].strip():
            out.append((at, m.start()))
        at = m.end()
    if text[at:].strip():
        out.append((at, len(text)))
    return out


def best_span(text: str, question: str, budget: int, count: Callable[[str], int],
              read: list[tuple[int, int]] = ()) -> tuple[int, int]:  # fmt: skip
    """(start, end) of the span of `text` around its sentence closest to `question`, at most
    `budget` tokens (the best sentence alone may be more: it is never cut inside); one of the
    spans `read` before if it holds that sentence and fits."""
    if count(text) <= budget:
        return 0, len(text)
    sents = spans(text)
    if len(sents) < 2:
        return 0, len(text)
    want = words(question)
    scores = [len(want & words(text[a:b])) for a, b in sents]
    best = scores.index(max(scores))  # ties: the earliest, often the heading's own sentence
    for a, b in read:
        if a <= sents[best][0] and sents[best][1] <= b and count(text[a:b]) <= budget:
            return a, b
    cost = [count(text[a:b]) for a, b in sents]
    lo = hi = best
    spent = cost[best]
    grew = True
    while grew:
        grew = False
        for i in (hi + 1, lo - 1):  # after first: what follows a matching line explains it
            if 0 <= i < len(sents) and not lo <= i <= hi and spent + cost[i] <= budget:
                lo, hi, spent, grew = min(lo, i), max(hi, i), spent + cost[i], True
    return sents[lo][0], sents[hi][1]


class Spans:
    """The spans earlier questions read of each passage (by its location and a hash of its
    text), most recent first; kept in RAM and, given a file, across processes (0600)."""

    LIMIT = 4096  # passages remembered
    PER_PASSAGE = 4

    def __init__(self, path: Path | None = None):
        self.path = path
        self.seen: OrderedDict[str, list[list[int]]] = OrderedDict()
        if path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                self.seen.update(json.loads(path.read_text()))

    @staticmethod
    def key(src: Source) -> str:
        digest = hashlib.sha256(src.passage.text.encode()).hexdigest()[:16]
        return f"{src.where}#{digest}"

    def of(self, src: Source) -> list[tuple[int, int]]:
        return [(a, b) for a, b in self.seen.get(self.key(src), [])]

    def read(self, src: Source, span: tuple[int, int]) -> None:
        key = self.key(src)
        were = [s for s in self.seen.pop(key, []) if tuple(s) != span]
        self.seen[key] = [list(span)] + were[: self.PER_PASSAGE - 1]
        while len(self.seen) > self.LIMIT:
            self.seen.popitem(last=False)

    def save(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):  # a read-only home costs the next question its reuse
            write_private(self.path, json.dumps(self.seen).encode())


def trim(sources: list[Source], question: str, budget: int, count: Callable[[str], int],
         spans_read: Spans | None = None):  # fmt: skip
    """`sources` with each passage's text cut to its best span (budget 0: unchanged),
    preferring a span read before (`spans_read`, which learns the spans chosen now)."""
    if budget <= 0:
        return sources
    out = []
    for s in sources:
        read = spans_read.of(s) if spans_read is not None else []
        a, b = best_span(s.passage.text, question, budget, count, read)
        if spans_read is not None:
            spans_read.read(s, (a, b))
        text = s.passage.text[a:b]
        out.append(dataclasses.replace(s, passage=dataclasses.replace(s.passage, text=text)))
    if spans_read is not None:
        spans_read.save()
    return out
