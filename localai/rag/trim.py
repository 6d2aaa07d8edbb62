"""Stage 2a: shorten each passage to its best sentences before packing.

Prefill is most of the time to the first token on a laptop CPU (~60 prompt tokens/s for the
default model on 2 cores), and most of an indexed chunk is not what the question asked. So a
passage longer than the model's budget (catalog `rag_passage_tokens`) keeps the sentence that
shares most words with the question and grows around it, a sentence after then one before,
while the budget lasts. The kept text is one contiguous span of the passage, byte for byte, so
a quote from it is a quote from the file: citation checks (cite.py) re-read the whole chunk
and are unchanged. BENCHMARKS.md ("RAG time to first token") has the budget's measurements.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

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


def best_span(text: str, question: str, budget: int, count: Callable[[str], int]) -> str:
    """The span of `text` around its sentence closest to `question`, at most `budget` tokens
    (the best sentence alone may be more: it is never cut inside)."""
    if count(text) <= budget:
        return text
    sents = spans(text)
    if len(sents) < 2:
        return text
    want = words(question)
    scores = [len(want & words(text[a:b])) for a, b in sents]
    best = scores.index(max(scores))  # ties: the earliest, often the heading's own sentence
    cost = [count(text[a:b]) for a, b in sents]
    lo = hi = best
    spent = cost[best]
    grew = True
    while grew:
        grew = False
        for i in (hi + 1, lo - 1):  # after first: what follows a matching line explains it
            if 0 <= i < len(sents) and not lo <= i <= hi and spent + cost[i] <= budget:
                lo, hi, spent, grew = min(lo, i), max(hi, i), spent + cost[i], True
    return text[sents[lo][0] : sents[hi][1]]


def trim(sources: list[Source], question: str, budget: int, count: Callable[[str], int]):
    """`sources` with each passage's text cut to its best span (budget 0: unchanged)."""
    if budget <= 0:
        return sources
    out = []
    for s in sources:
        text = best_span(s.passage.text, question, budget, count)
        out.append(dataclasses.replace(s, passage=dataclasses.replace(s.passage, text=text)))
    return out
