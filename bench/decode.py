"""Decode speed and TTFT: `localai run` against raw llama-cpp-python, side by side in one run.

Both sides run as fresh processes on the same GGUF, the same chat-templated prompt, greedy
sampling, the same context size and thread count; runs alternate (A B A B ...) so that machine
noise hits both alike. Raw llama-cpp-python uses `Llama.create_completion(stream=True)`, timed
from the call to the first chunk (TTFT) and over the remaining chunks (decode tokens/s).
Prints one JSON object; the ratio is localai / raw (goal >= 0.95).

    python bench/decode.py [--model smollm2-135m] [--runs 5] [--max-tokens 128]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from speed_args import speed_parser

RAW = r"""
import json, sys, time, llama_cpp
path, prompt = sys.argv[1], sys.argv[2]
n, ctx, threads = (int(x) for x in sys.argv[3:6])
llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                      verbose=False)
t0 = time.perf_counter(); first = None; k = 0
for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True):
    if chunk["choices"][0]["finish_reason"] is not None:
        break  # the closing chunk carries no token
    k += 1
    if first is None: first = time.perf_counter()
end = time.perf_counter()
print(json.dumps({"completion_tokens": k, "ttft_s": first - t0,
                  "tokens_per_s": (k - 1) / (end - first)}))
"""

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def localai_run(model: str, n: int, ctx: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "localai", "run", PROMPT, "--model", model, "-t", "0"]
    cmd += ["--max-tokens", str(n), "--ctx", str(ctx), "--threads", str(threads), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["stats"]


def raw_run(path: str, prompt: str, n: int, ctx: int, threads: int) -> dict:
    cmd = [sys.executable, "-c", RAW, path, prompt, str(n), str(ctx), str(threads)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = speed_parser()
    a = ap.parse_args()

    from localai.config import load_settings
    from localai.engine import Message
    from localai.engine.llamacpp import LlamaCppEngine
    from localai.runtime import open_catalog

    path = open_catalog(load_settings()).ensure(a.model)
    eng = LlamaCppEngine(path, a.model, context_length=a.ctx, threads=1)
    prompt = eng.apply_chat_template([Message("user", PROMPT)])
    eng.close()

    ours, raw = [], []
    for _ in range(a.runs):
        ours.append(localai_run(a.model, a.max_tokens, a.ctx, a.threads))
        raw.append(raw_run(str(path), prompt, a.max_tokens, a.ctx, a.threads))

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    result = {
        "bench": "decode",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
        "model": a.model,
        "runs": a.runs,
        "max_tokens": a.max_tokens,
        "threads": a.threads,
        "localai": {
            "tokens_per_s": med(ours, "tokens_per_s"),
            "ttft_s": med(ours, "ttft_s"),
            "completion_tokens": med(ours, "completion_tokens"),
        },  # fmt: skip
        "raw_llama_cpp": {
            "tokens_per_s": med(raw, "tokens_per_s"),
            "ttft_s": med(raw, "ttft_s"),
            "completion_tokens": med(raw, "completion_tokens"),
        },  # fmt: skip
    }
    result["ratio_tokens_per_s"] = round(
        result["localai"]["tokens_per_s"] / result["raw_llama_cpp"]["tokens_per_s"], 3
    )
    result["ratio_ttft"] = round(result["localai"]["ttft_s"] / result["raw_llama_cpp"]["ttft_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
