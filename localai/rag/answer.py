"""The RAG pipeline end to end, shared by `localai ask` and the daemon:

    rag = Answerer(index, engine)
    prep = rag.prepare(messages, k=8, source=None, answer_tokens=256)  # retrieve + pack
    ... generate from prep.messages with any runner (in-process, or the daemon's slot) ...
    done = rag.finish(prep, answer_text, stats)                       # cite + verify

`prepare` registers the prompt's head (system message and layout example, up to the first
passage) with an engine that keeps fixed prefixes (engine/prefix.py), so its KV is computed once
per model and layout, not once per question; and each passage's text (its block without the rank
label) with an engine that keeps passages' KV (engine/pieces.py), so a passage retrieved again is
not computed again.

`finish` returns a CitedDone: the answer followed by a readable "Sources" list, the checked
citations, and what retrieval kept and dropped (and why). The prompt layout is the one the
Answerer is given (the daemon and `localai ask` give the loaded model's: runtime.model_layout),
unless the request names one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import Delta, Done, Engine, GenerationStats, Message, SamplingParams, chat
from ..engine.tokengen import shared_prefix
from ..index.facade import Index
from .cite import Citation, cite
from .prompt import DEFAULT_LAYOUT, Layout, Packed, body, pack
from .retrieve import Retrieved, retrieve
from .trim import Spans, trim

DEFAULT_K = 8


class NoQuestion(ValueError):
    """The request cannot be answered from documents (no question, or nothing indexed)."""


@dataclass
class Prepared:
    question: str
    retrieved: Retrieved
    packed: Packed

    @property
    def messages(self) -> list[Message]:
        return self.packed.messages

    def summary(self) -> dict:
        """What retrieval kept and dropped, and why (for `stats` and the Sources list)."""
        return {"retrieved": len(self.retrieved.sources) + self.retrieved.stale,
                "used": len(self.packed.used), "dropped_for_context": self.packed.dropped,
                "dropped_stale": self.retrieved.stale,
                "passage_budget_tokens": self.packed.budget}  # fmt: skip

    def found(self) -> dict:
        """The summary and each passage given to the model (rank, path, lines): what a client
        shows while the answer is still being computed."""
        given = [{"n": s.rank, "path": s.passage.path, "start_line": s.passage.start_line,
                  "end_line": s.passage.end_line, "where": s.where}
                 for s in self.packed.used]  # fmt: skip
        return self.summary() | {"passages": given}


@dataclass
class Found:
    """The passages an answer will come from, known before the model starts: shown at once
    (`sources` is Prepared.found())."""

    sources: dict


@dataclass
class CitedDone(Done):
    citations: list[Citation] = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # Prepared.summary()
    answer: str = ""  # the model's text without the Sources list


class Answerer:
    def __init__(self, index: Index, engine: Engine, layout: Layout = DEFAULT_LAYOUT,
                 keep_head: bool = True, passage_tokens: int = 0,
                 keep_passages: bool = True, spans_file: Path | None = None):  # fmt: skip
        self.index, self.engine, self.layout = index, engine, layout
        self.keep_head = keep_head  # False: every question computes its whole prompt (bench)
        self.keep_passages = keep_passages  # False: passages' KV never reused (bench)
        # the spans of trimmed passages read before, read again when they serve (trim.py)
        self.spans = Spans(spans_file) if keep_passages else None
        self.passage_tokens = passage_tokens  # each passage cut to its best span (trim.py)

    def prepare(
        self,
        history: list[Message],
        k: int = DEFAULT_K,
        source: str | Path | None = None,
        answer_tokens: int | None = None,
        layout: Layout | None = None,
    ) -> Prepared:
        """Retrieve and pack; `layout` overrides the Answerer's for this question only."""
        question = next((m.content for m in reversed(history) if m.role == "user"), "").strip()
        if not question:
            raise NoQuestion("there is no question: the last user message is empty")
        if not self.index.stats()["chunks"]:
            raise NoQuestion("no documents are indexed yet: run `localai index PATH` first")
        found = retrieve(self.index, question, k, source)
        found.sources = trim(found.sources, question, self.passage_tokens, self._count,
                             self.spans)  # fmt: skip
        packed = pack(self.engine, history, found.sources, answer_tokens, layout or self.layout)
        keep_head = getattr(self.engine, "keep_prefix", None) if self.keep_head else None
        keep_pieces = getattr(self.engine, "keep_pieces", None) if self.keep_passages else None
        if keep_head or keep_pieces:
            full = self.engine.tokenize(self.engine.apply_chat_template(packed.messages))
            if keep_head and packed.head:
                self._keep_head(keep_head, packed.head, full)
            if keep_pieces:
                keep_pieces(full, [body(s) for s in packed.used])
        return Prepared(question, found, packed)

    def _count(self, text: str) -> int:
        return len(self.engine.tokenize(text, special=False))

    def _keep_head(self, keep, head: str, full: list[int]) -> None:
        """Register the head's tokens as the full prompt `full` spells them (a merge across the
        boundary would make the head's own tokenization differ in its last token)."""
        n = shared_prefix(self.engine.tokenize(head), full)
        if n > 1:
            keep(full[:n])

    def finish(self, prep: Prepared, answer: str, stats: GenerationStats) -> CitedDone:
        citations = cite(answer, prep.packed.used, self.index.read)
        listing = sources_text(citations, prep)
        return CitedDone(answer + listing, stats, citations, prep.summary(), answer)


def sources_text(citations: list[Citation], prep: Prepared) -> str:
    """The readable list appended to the answer: each citation with its check, then what was
    dropped. Unverified citations say so; they are never shown as plain fact."""
    lines = ["", "", "Sources:"]
    for c in citations:
        mark = "verified" if c.verified else f"NOT VERIFIED: {c.reason}"
        where = c.where if c.path else "(unknown source)"
        quote = f' "{c.quote}"' if c.quote else ""
        lines.append(f"[{c.n}] {where}{quote} ({'inferred, ' if c.inferred else ''}{mark})")
    if not citations:
        given = ", ".join(f"[{s.rank}] {s.where}" for s in prep.packed.used) or "none"
        lines.append(f"the answer cites none of the passages it was given ({given})")
    s = prep.summary()
    if s["dropped_for_context"]:
        lines.append(f"{s['dropped_for_context']} more passage(s) did not fit the context "
                     f"({s['passage_budget_tokens']:,} tokens for passages)")  # fmt: skip
    if s["dropped_stale"]:
        lines.append(f"{s['dropped_stale']} passage(s) skipped: their files changed since "
                     "indexing (run `localai index`)")  # fmt: skip
    return "\n".join(lines)


def ask(
    rag: Answerer,
    question: str,
    params: SamplingParams,
    k: int = DEFAULT_K,
    source: str | Path | None = None,
) -> Iterator[Found | Delta | CitedDone]:
    """In-process answer: the passages (Found), the model's deltas, the Sources list as one
    more delta, a CitedDone."""
    prep = rag.prepare([Message("user", question)], k, source, params.max_tokens)
    yield Found(prep.found())
    for ev in chat(rag.engine, prep.messages, params):
        if isinstance(ev, Done):
            done = rag.finish(prep, ev.text, ev.stats)
            yield Delta(done.text[len(ev.text) :])
            yield done
        else:
            yield ev
