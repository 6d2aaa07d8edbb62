"""Stage 2: pack passages into the model's context under a token budget.

Passages are taken best first while they fit; the rest are dropped and counted (the answer says
how many and why). The kept passages are then laid out best-at-the-edges (1, 3, 5, …, 6, 4, 2):
models read the start and the end of a long context more reliably than its middle. Each passage
keeps the number of its rank, so [1] is always the best passage wherever it sits.

Where the passages and the citation instruction go is a Layout; bench/rag.py measures them
against each other on the same questions (BENCHMARKS.md, "RAG"). Which one a model gets is its
catalog entry's `rag_layout` (models/catalog.toml): the one-shot example helps a model that
imitates its format, and a small model that copies it verbatim stays on `system`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine import Engine, Message

if TYPE_CHECKING:  # every command's wiring (runtime) checks layout names: keep the index out
    from .retrieve import Source

DEFAULT_ANSWER_TOKENS = 512  # room kept for the answer when the request sets no max_tokens

_RULES = (
    "Answer the user's question using only the numbered sources below. After each sentence "
    "that uses a source, cite it like [1] or [2][3]. Quote or closely paraphrase the sources. "
    "If the sources do not answer the question, say that they do not."
)
_BRIEF = "Answer questions using only the numbered sources the user gives."
_ASK = (
    "Answer in short sentences, one fact each, quoting or closely paraphrasing the sources. "
    "End every sentence with the number of the source it comes from, like [1]. If the sources "
    "do not answer the question, say so."
)
# A made-up exchange in the same layout as the real one, so that the first answer the model
# sees already cites; nothing in it comes from any indexed corpus.
EXAMPLE_QUESTION = "How hot should the water be for green tea?"
EXAMPLE_SOURCES = {
    1: ("notes/kettle.md:3-4",
        "The kettle switches itself off when the water boils. It holds 1.7 litres."),
    2: ("notes/tea.md:8-9", "Green tea is steeped for two minutes at 80 °C."),
}  # fmt: skip
EXAMPLE_ANSWER = (
    "Green tea is steeped for two minutes at 80 °C [2]. "
    "The kettle switches off when the water boils, so let it cool first [1]."
)


@dataclass(frozen=True)
class Layout:
    """Where the sources and the citation instruction sit in the messages."""

    name: str
    system: str  # instruction in the system message
    sources_in_user: bool  # sources (and `ask`) in the last user turn, else in the system message
    ask: str = ""  # put after the question: the last thing read before answering
    example: bool = False  # a made-up question and cited answer precede the conversation

    def user_turn(self, sources: str | None, question: str) -> str:
        tail = f"\n\n{self.ask}" if self.ask else ""
        if sources is None:  # the sources are in the system message
            return question + tail
        return f"Sources:\n\n{sources}Question: {question.strip()}{tail}"

    def messages(self, system: str, history: list[Message], sources: str) -> list[Message]:
        turns, shot = list(history), []
        last = max((i for i, m in enumerate(turns) if m.role == "user"), default=None)
        if last is not None:
            own = sources if self.sources_in_user else None
            turns[last] = Message("user", self.user_turn(own, turns[last].content))
        if not self.sources_in_user:
            system = f"{system}\n\nSources:\n\n{sources}".rstrip()
        elif self.example:
            blocks = "".join(f"[{n}] {where}\n{text}\n\n"
                             for n, (where, text) in EXAMPLE_SOURCES.items())  # fmt: skip
            shot = [Message("user", self.user_turn(blocks, EXAMPLE_QUESTION)),
                    Message("assistant", EXAMPLE_ANSWER)]  # fmt: skip
        return [Message("system", system)] + shot + turns


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("system", _RULES, sources_in_user=False),
        Layout("oneshot", _BRIEF, sources_in_user=True, ask=_ASK, example=True),
    )
}
DEFAULT_LAYOUT = LAYOUTS["system"]


class UnknownLayout(ValueError):
    """A layout name (a model's catalog `rag_layout`) that is not one of LAYOUTS."""


def layout_named(name: str) -> Layout:
    """The layout called `name`; a name that is not one is refused, listing those that are."""
    if name not in LAYOUTS:
        raise UnknownLayout(f"unknown rag_layout {name!r}; choose one of: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


@dataclass
class Packed:
    messages: list[Message]
    used: list[Source]  # in rank order
    dropped: int  # passages that did not fit the budget
    budget: int  # tokens available for passages
    head: str = ""  # the rendered prompt up to the first passage: the same for every question


_MARK = "\x00passages\x00"  # stands where the passages go, to find where the prompt's head ends


def prompt_head(engine: Engine, layout: Layout, system: str, history: list[Message]) -> str:
    """The prompt text before the passages: system message, layout example and any earlier
    turns. Passages and the question come after it, so it is shared by every question and its
    KV can be computed once (engine/prefix.py)."""
    text = engine.apply_chat_template(layout.messages(system, history, _MARK))
    at = text.find(_MARK)
    return text[:at] if at > 0 else ""


def edges_first(items: list) -> list:
    """Best at both ends, weakest in the middle: [1, 3, 5, …, 6, 4, 2] for ranked input."""
    return items[0::2] + items[1::2][::-1]


def block(src: Source) -> str:
    return f"[{src.rank}]{body(src)}\n\n"


def body(src: Source) -> str:
    """A passage's block without its rank label and the blank line after it: the same text
    whatever rank it gets and whatever follows, so that its KV can be kept and reused by the
    next question that retrieves it (engine/pieces.py)."""
    return f" {src.where}\n{src.passage.text.strip()}"


def pack(
    engine: Engine,
    history: list[Message],
    sources: list[Source],
    answer_tokens: int | None,
    layout: Layout = DEFAULT_LAYOUT,
) -> Packed:
    """The messages to generate from: the conversation with the sources that fit, placed as
    `layout` says. Raises nothing for too many sources; a question that alone does not fit is
    left for the engine's context check to refuse with both counts."""
    reserve = answer_tokens or DEFAULT_ANSWER_TOKENS
    system = layout.system
    if history and history[0].role == "system":  # one system message: many templates want that
        system = history[0].content.strip() + "\n\n" + system
        history = history[1:]
    bare = engine.apply_chat_template(layout.messages(system, history, ""))
    budget = engine.context_length - reserve - len(engine.tokenize(bare))
    used, spent = [], 0
    for src in sources:
        cost = len(engine.tokenize(block(src), special=False))
        if spent + cost > budget:
            continue  # a shorter, lower-ranked passage may still fit
        used.append(src)
        spent += cost
    text = "".join(block(s) for s in edges_first(used))
    return Packed(layout.messages(system, history, text), used, len(sources) - len(used),
                  max(budget, 0), prompt_head(engine, layout, system, history))  # fmt: skip
