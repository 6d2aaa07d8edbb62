"""RAG time to first token (bench/rag.py --part ttft): today's path against each change, same
run, same loaded model, questions interleaved so that a noisy machine hits every variant alike.

For each question and each variant, four answers:
  first   a new process's first question (RAM cache dropped, the live KV forgotten; a variant
          that keeps the head on disk finds it there, except for the very first question, and a
          variant that keeps passages' KV finds those that earlier questions stored)
  repeat  the same question again at once (the live KV holds the whole prompt)
  new     another question for the same page (a paraphrase: mostly the same passages), right
          after, with nothing in between
  again   that other question once more in a new process: with kept passages, every passage is
          in the store, which is what any question costs whose passages were read before (only
          the question's own tokens differ)
Variants: `today` (no kept head, whole passages; always run), then those listed (--trims):
`head` (the fixed head kept, rag/answer.py),
`head+trimN` (also each passage cut to its best N tokens, rag/trim.py), `head+trimN+kK` (and
only K passages), and `+kv` after any of these (passages' KV kept and put back wherever they
land, engine/pieces.py) or `+kvx` (put back only after the same tokens: exact); `kv` or `kvx`
alone: whole passages. Per variant and case:
TTFT p50/p90, total p50, prefill and cached tokens, and the share of answers with a verified
citation into the expected page.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

from localai.engine import Done, Message, SamplingParams, chat
from localai.index.facade import Index
from localai.rag.answer import Answerer

# a second wording of index_pydoc.QUESTIONS, same expected page, in the same order
PARAPHRASES = [
    "sort records by the value of one of their fields",
    "loop over the lines of a file",
    "make an isolated environment with its own installed packages",
    "add a --verbose flag to the options my script accepts",
    "get the standard output of an external program",
    "write a dictionary out as a JSON string",
    "check whether a string begins with a pattern",
    "ExceptionGroup and except* in Python 3.11",
    "download a web page from a URL",
    "give a dataclass field a default value",
    "time how long a small piece of code takes",
    "convert a datetime between time zones",
    "run several coroutines at the same time",
    "count how many times each item appears",
    "copy a whole folder with its subfolders",
    "send log records to a file",
]


CASES = ("first", "repeat", "new", "again")


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2)


def parse(spec: str) -> tuple[str, int, int | None, str]:
    """ "64" → (head+trim64, 64, None, ""), "48k3+kv" → (head+trim48+k3+kv, 48, 3, "moved"),
    "64+kvx" → (…, "exact"); "today", "head", "kv" and "kvx" (whole passages, their KV kept)
    as they are. The last item is the passages' KV reuse (config passage_kv_reuse), "" none."""
    base, _, kv = spec.partition("+")
    if base in ("kv", "kvx"):
        base, kv = "", base
    reuse = {"": "", "kv": "moved", "kvx": "exact"}[kv]
    if base in ("today", "head", ""):
        return spec, 0, None, reuse
    n, _, fewer = base.partition("k")
    name = f"head+trim{n}" + (f"+k{fewer}" if fewer else "") + (f"+{kv}" if kv else "")
    return name, int(n), int(fewer) if fewer else None, reuse


def share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 3)


def one(rag: Answerer, question: str, want: str, k: int, params: SamplingParams) -> dict:
    t0 = time.perf_counter()
    prep = rag.prepare([Message("user", question)], k, None, params.max_tokens)
    retrieve_s = time.perf_counter() - t0
    gen = next(ev for ev in chat(rag.engine, prep.messages, params) if isinstance(ev, Done))
    done = rag.finish(prep, gen.text, gen.stats)
    s = gen.stats
    return {"ttft_s": round(retrieve_s + s.ttft_s, 2), "total_s": round(retrieve_s + s.total_s, 2),
            "retrieve_s": round(retrieve_s, 3), "prompt_tokens": s.prompt_tokens,
            "prefill_tokens": s.extra["prefill_tokens"], "cached_tokens": s.cached_tokens,
            "prefix_source": s.extra["prefix_source"],
            "passage_tokens": s.extra["cached_from"]["passages"],
            "cited_hit": any(c.verified and want in c.path for c in done.citations),
            "given_hit": any(want in src.passage.path for src in prep.packed.used),
            "passages": [src.where for src in prep.packed.used],
            "answer": done.answer}  # fmt: skip


def run(engine, ix: Index, layout, k: int, max_tokens: int, questions: list[tuple[str, str]],
        trims: list[str], kv_dir: Path, log=print) -> dict:  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=1)
    variants = {"today": (Answerer(ix, engine, layout, keep_head=False, keep_passages=False), k)}
    reuse_of = {"today": ""}
    for spec in [t for t in trims if t != "today"]:  # "64": passages of at most 64 tokens
        name, n, fewer, reuse = parse(spec)
        rag = Answerer(ix, engine, layout, passage_tokens=n, keep_passages=bool(reuse))
        variants[name], reuse_of[name] = (rag, fewer or k), reuse
    shutil.rmtree(kv_dir, ignore_errors=True)  # the first question pays for the head once
    rows: dict[str, list[dict]] = {name: [] for name in variants}

    def fresh_process() -> None:  # nothing in RAM, the files stay
        engine.prefixes.clear()
        engine.pieces.clear()
        engine.forget()

    for i, (question, want) in enumerate(questions):
        for name, (rag, k) in variants.items():
            fresh_process()
            engine.pieces.exact = reuse_of[name] == "exact"
            row = {"question": i + 1}
            row["first"] = one(rag, question, want, k, params)
            row["repeat"] = one(rag, question, want, k, params)
            row["new"] = one(rag, PARAPHRASES[i], want, k, params)
            fresh_process()
            row["again"] = one(rag, PARAPHRASES[i], want, k, params)
            seen = set(row["first"]["passages"])
            row["new"]["seen_share"] = round(
                len(seen & set(row["new"]["passages"])) / max(1, len(row["new"]["passages"])), 2
            )
            rows[name].append(row)
            log({"variant": name, **{c: {key: row[c][key] for key in ("ttft_s", "prefill_tokens",
                 "cached_tokens", "passage_tokens", "cited_hit")} for c in CASES},
                 "question": i + 1})  # fmt: skip
    return {name: summary(got, rows["today"]) for name, got in rows.items()} | {"rows": rows}


def summary(rows: list[dict], base: list[dict]) -> dict:
    out = {}
    for case in CASES:
        got = [r[case] for r in rows]
        ttft = [g["ttft_s"] for g in got]
        was = statistics.median(r[case]["ttft_s"] for r in base)
        out[case] = {"ttft_p50_s": quantile(ttft, 0.5), "ttft_p90_s": quantile(ttft, 0.9),
                     "ttft_p50_vs_today": round(statistics.median(ttft) / was, 2),
                     "total_p50_s": quantile([g["total_s"] for g in got], 0.5),
                     "prefill_tokens_p50": statistics.median(g["prefill_tokens"] for g in got),
                     "cached_tokens_p50": statistics.median(g["cached_tokens"] for g in got),
                     "passage_tokens_p50": statistics.median(g["passage_tokens"] for g in got),
                     "prompt_tokens_p50": statistics.median(g["prompt_tokens"] for g in got),
                     "hit_given": share([g["given_hit"] for g in got]),
                     "hit_cited": share([g["cited_hit"] for g in got])}  # fmt: skip
    out["new"]["seen_share_mean"] = round(statistics.mean(r["new"]["seen_share"] for r in rows), 2)
    return out


if __name__ == "__main__":
    sys.exit("run through bench/rag.py --part ttft")


class Counter:
    """The Engine's text side only (vocabulary and chat template, no weights): enough to pack
    prompts and count their tokens for --part tokens."""

    def __init__(self, path: Path, name: str, context_length: int):
        import llama_cpp

        from localai.engine.tokengen import Vocab

        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab, self.name, self.context_length = Vocab(llm), name, context_length

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.vocab.tokenize(text, special)

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> str:
        return self.vocab.render(messages, add_generation_prompt, tools)


def tokens_only(counter: Counter, ix: Index, layout, k: int, max_tokens: int,
                questions: list[tuple[str, str]], trims: list[str]) -> dict:  # fmt: skip
    """Prompt tokens to compute per variant and case, and whether the expected page is given,
    over every question: what the timed run's TTFT follows, without running the model."""
    from localai.engine.tokengen import shared_prefix

    out = {}
    for spec in ["today", "head", *[t for t in trims if t[0].isdigit() and "+" not in t]]:
        name, trim, fewer, _ = parse(spec)
        rag = Answerer(ix, counter, layout, keep_head=False, passage_tokens=trim)
        first, new, given, prompt = [], [], [], []
        for i, (question, want) in enumerate(questions):
            toks = []
            for q in (question, PARAPHRASES[i]):
                prep = rag.prepare([Message("user", q)], fewer or k, None, max_tokens)
                toks.append(counter.tokenize(counter.apply_chat_template(prep.messages)))
                head = shared_prefix(toks[-1], counter.tokenize(prep.packed.head))
                given.append(any(want in s.passage.path for s in prep.packed.used))
            kept = 0 if spec == "today" else head
            first.append(len(toks[0]) - kept)
            new.append(len(toks[1]) - max(kept, shared_prefix(toks[0], toks[1])))
            prompt.append(len(toks[0]))
        out[name] = {"prompt_tokens_p50": statistics.median(prompt), "head_tokens": head,
                     "first_prefill_p50": statistics.median(first),
                     "new_prefill_p50": statistics.median(new),
                     "new_prefill_p90": quantile(new, 0.9), "hit_given": share(given)}  # fmt: skip
    return out
