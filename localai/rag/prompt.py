"""Stage 2: pack passages into the model's context under a token budget.

Passages are taken best first while they fit; the rest are dropped and counted (the answer says
how many and why). The kept passages are then laid out best-at-the-edges (1, 3, 5, …, 6, 4, 2):
models read the start and the end of a long context more reliably than its middle. Each passage
keeps the number of its rank, so [1] is always the best passage wherever it sits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import Engine, Message
from .retrieve import Source

SYSTEM = (
    "Answer the user's question using only the numbered sources below. After each sentence "
    "that uses a source, cite it like [1] or [2][3]. Quote or closely paraphrase the sources. "
    "If the sources do not answer the question, say that they do not.\n\nSources:\n\n"
)
DEFAULT_ANSWER_TOKENS = 512  # room kept for the answer when the request sets no max_tokens


@dataclass
class Packed:
    messages: list[Message]
    used: list[Source]  # in rank order
    dropped: int  # passages that did not fit the budget
    budget: int  # tokens available for passages


def edges_first(items: list) -> list:
    """Best at both ends, weakest in the middle: [1, 3, 5, …, 6, 4, 2] for ranked input."""
    return items[0::2] + items[1::2][::-1]


def block(src: Source) -> str:
    return f"[{src.rank}] {src.where}\n{src.passage.text.strip()}\n\n"


def pack(
    engine: Engine, history: list[Message], sources: list[Source], answer_tokens: int | None
) -> Packed:
    """The messages to generate from: a system message with the sources that fit, then the
    conversation. Raises nothing for too many sources; a question that alone does not fit is
    left for the engine's context check to refuse with both counts."""
    reserve = answer_tokens or DEFAULT_ANSWER_TOKENS
    system = SYSTEM
    if history and history[0].role == "system":  # one system message: many templates want that
        system = history[0].content.strip() + "\n\n" + SYSTEM
        history = history[1:]
    bare = engine.apply_chat_template([Message("system", system)] + history)
    budget = engine.context_length - reserve - len(engine.tokenize(bare))
    used, spent = [], 0
    for src in sources:
        cost = len(engine.tokenize(block(src), special=False))
        if spent + cost > budget:
            continue  # a shorter, lower-ranked passage may still fit
        used.append(src)
        spent += cost
    text = system + "".join(block(s) for s in edges_first(used))
    return Packed([Message("system", text.rstrip())] + history, used,
                  len(sources) - len(used), max(budget, 0))  # fmt: skip
