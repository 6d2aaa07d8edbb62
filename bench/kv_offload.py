"""KV pages on disk under a RAM budget (--kv-budget) against the same sparse run all in RAM.

Each side runs in its own process, so its memory is its own: the torch runner loads the model
with an attention budget (a share of the context), prefills sparse_attention.py's haystack (the
Python docs with needles and variable chains), then answers every question after it (greedy, 24
tokens), the cache cut back to the haystack between questions. Measured per side: prefill
seconds, decode tokens/s over the answers, the cache's RAM (the runner's own count), KV bytes
read from disk per decode step, RSS after loading (the runtime; the weights are a memory map
that the prefill then touches in full), and the peak RSS while answering (VmHWM, reset after
the prefill through /proc/self/clear_refs), also net of those two; and the answers, which must
be the same on every side. The pages on disk run twice: with the read-ahead
and without (`--read-ahead` layers ahead, each layer's pages of the step before read back in the
background while a layer computes); its precision and recall are printed. Prints one JSON
object.

    python bench/kv_offload.py [--model qwen2.5-coder-0.5b] [--ctx 8192] [--budget 10]
                               [--kv-budget 64M] [--k-bits 16] [--needles 10] [--chains 3]
                               [--read-ahead 1] [--sides ram disk no-ahead]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparse_attention import greedy, haystack, prefill  # noqa: E402

from localai.config import load_settings  # noqa: E402
from localai.engine import Message  # noqa: E402
from localai.engine.torch import TorchEngine  # noqa: E402
from localai.engine.torch.kv import READ_AHEAD  # noqa: E402
from localai.runtime import open_catalog  # noqa: E402

# side: (pages on disk under --kv-budget, read-ahead on)
SIDES = {"ram": (False, False), "disk": (True, True), "no-ahead": (True, False)}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(a) -> dict:
    path = open_catalog(load_settings()).ensure(a.model)
    kw = {"kv_budget": a.kv_budget, "kv_dir": Path(a.work)} if a.kv_budget else {}
    kw["kv_read_ahead"] = a.read_ahead
    budget = f"{a.budget:g}%"
    eng = TorchEngine(path, a.model, a.ctx + 512, a.threads, k_bits=a.k_bits, v_bits=a.k_bits,
                      attn_budget=budget, **kw)  # fmt: skip
    m = eng.model
    rss_loaded = status_kib("VmRSS")
    rng = random.Random(a.ctx)
    docs = "\n\n".join(topics[k] for k in sorted(topics))
    ids = eng.tokenize(docs[: a.ctx * 8], special=False)
    cut = a.ctx - 64 - 24 * (a.needles + 4 * a.chains)
    doc, questions = haystack(eng.detokenize(ids[:cut]), a.needles, a.chains, rng)
    full = eng.apply_chat_template([Message("user", doc + "\x00")])
    head, tail = full.split("\x00")
    hay = eng.tokenize(head, special=True)
    eng._threads(a.threads)
    prefill_s = prefill(eng, hay)
    rss_prefilled = status_kib("VmRSS")
    n0 = m.cache.n
    stop = {eng.vocab.llm.token_eos(), *eng.tokenize("<|im_end|>", special=True)}
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS from here on
    stats0 = eng._extra_stats(None)
    steps0 = m.attn_stats.decode_steps
    t0 = time.perf_counter()
    answers, hits = [], 0
    for q, want, _ in questions:
        m.cache.truncate(n0)
        end = eng.tokenize(f"\n\n{q}{tail}", special=True)
        for t in end[:-1]:
            m.forward(torch.tensor([t]))
        answer = eng.detokenize(greedy(m, end[-1], stop, 24)).strip()
        answers.append(answer[:60])
        hits += want in re.sub(r"[^0-9]", " ", answer).split()
    seconds = time.perf_counter() - t0
    steps = m.attn_stats.decode_steps - steps0
    st = eng._extra_stats(stats0)
    out = {
        "context_tokens": n0,
        "prefill_s": round(prefill_s, 1),
        "decode_tokens_per_s": round(steps / seconds, 2),
        "hits": hits,
        "kv_ram_bytes": m.cache.nbytes,
        "kv_offloaded_bytes": m.cache.offloaded_bytes(),
        "kv_bytes_read_per_step": st.get("kv_bytes_read_per_token"),
        "kv_disk_bytes_read_per_step": st.get("kv_disk_bytes_read_per_token", 0),
        **{k: st[k] for k in ("kv_read_ahead_precision", "kv_read_ahead_recall") if k in st},
        "weights_bytes": m.weight_bytes,
        "rss_after_load_mib": round(rss_loaded / 1024, 1),
        "rss_after_prefill_mib": round(rss_prefilled / 1024, 1),
        "peak_rss_answering_mib": round(status_kib("VmHWM") / 1024, 1),
        # what answering holds beyond the runtime (RSS after loading) and the weights (a memory
        # map, touched in full by the prefill): the KV cache and the step's buffers
        "peak_beyond_weights_mib": round(
            (status_kib("VmHWM") - rss_loaded) / 1024 - m.weight_bytes / 2**20, 1
        ),
        "answers": answers,
        **({"kv_pool_pages": eng.info()["kv_pool_pages"]} if a.kv_budget else {}),
    }
    eng.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--budget", type=float, default=10, help="attention budget, % of the context")
    ap.add_argument("--kv-budget", default="64M")
    ap.add_argument("--k-bits", type=int, default=16, help="K and V bits")
    ap.add_argument("--needles", type=int, default=10)
    ap.add_argument("--chains", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--read-ahead", type=int, default=READ_AHEAD, help="layers ahead")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    ap.add_argument("--work", default="/tmp/localai-bench/kv")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    Path(a.work).mkdir(parents=True, exist_ok=True)
    out = {"bench": "kv_offload", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "model": a.model,
           "ctx": a.ctx, "attn_budget": f"{a.budget:g}%", "k_bits": a.k_bits,
           "kv_budget": a.kv_budget, "read_ahead": a.read_ahead, "sides": {}}  # fmt: skip
    base = [sys.executable, __file__, "--child", "--model", a.model, "--ctx", str(a.ctx),
            "--budget", str(a.budget), "--k-bits", str(a.k_bits), "--needles", str(a.needles),
            "--chains", str(a.chains), "--threads", str(a.threads), "--work", a.work]  # fmt: skip
    for name in a.sides:
        budget, ahead = SIDES[name]
        extra = ["--kv-budget", a.kv_budget if budget else "",
                 "--read-ahead", str(a.read_ahead if ahead else 0)]  # fmt: skip
        r = subprocess.run(base + extra, capture_output=True, text=True, check=True)
        out["sides"][name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps({name: out["sides"][name]}), file=sys.stderr, flush=True)
    sides = list(out["sides"].values())
    out["same_answers"] = all(s["answers"] == sides[0]["answers"] for s in sides)
    if "ram" in out["sides"]:
        ram = out["sides"]["ram"]
        for name, s in out["sides"].items():
            if name != "ram":
                s["decode_vs_ram"] = round(s["decode_tokens_per_s"] / ram["decode_tokens_per_s"], 3)
                s["peak_rss_saved_mib"] = round(ram["peak_rss_answering_mib"]
                                                - s["peak_rss_answering_mib"], 1)  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
