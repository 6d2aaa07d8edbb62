"""Optional stage between retrieval and packing: ask the loaded model, passage by passage,
whether the passage answers the question, and move the "yes" passages ahead (stable: retrieval
order is kept within each group).

It uses only the Engine protocol (one greedy token per passage), so it runs on any backend. It
is off by default: bench/rag.py measures it against plain hybrid retrieval (nDCG@10 on
NFCorpus), and BENCHMARKS.md records why it is not used.
"""

from __future__ import annotations

import threading

from ..engine import Done, Engine, Message, SamplingParams, chat

PASSAGE_CHARS = 600  # enough for the model to judge; keeps each judgement's prefill small
ASK = ("Does the passage help answer the question? Reply with one word, yes or no.\n\n"
       "Question: {question}\n\nPassage: {passage}")  # fmt: skip


def judge(engine: Engine, question: str, passage: str, cancel=None) -> bool:
    """The model's one-word verdict (greedy)."""
    text = ASK.format(question=question, passage=passage[:PASSAGE_CHARS])
    params = SamplingParams(temperature=0.0, max_tokens=2)
    answer = ""
    for ev in chat(engine, [Message("user", text)], params, cancel):
        if isinstance(ev, Done):
            answer = ev.text
    return answer.strip().lower().startswith("yes")


def rerank(engine: Engine, question: str, passages: list[str],
           cancel: threading.Event | None = None) -> list[int]:  # fmt: skip
    """Indices of `passages` in their new order: judged relevant first, then the rest."""
    verdicts = [judge(engine, question, p, cancel) for p in passages]
    return sorted(range(len(passages)), key=lambda i: (not verdicts[i], i))
