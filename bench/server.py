"""TTFT and decode speed through the daemon's HTTP API against `localai run` in-process, side by
side in one run.

A: a streaming /v1/chat/completions request to a running `localai serve`, timed by the client
   (request sent → first content chunk; decode tokens/s = (completion_tokens - 1) over the time
   from the first to the last chunk). The daemon's own engine stats are recorded too.
B: `localai run --no-daemon --json` in a fresh process (the engine's stats, as the CLI reports
   them).
Both: the same model, context, threads, greedy sampling, the same prompts. Runs alternate
(A B A B ...) so machine noise hits both alike, and each run's prompt carries its run number so
the daemon cannot reuse a cached KV prefix of the previous run beyond the shared system prompt.
Prints one JSON object; overhead = server / in-process - 1 (goal: ≤ 5%).

    python bench/server.py [--model smollm2-135m] [--runs 5] [--max-tokens 128]
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from speed_args import median, speed_parser, stream_chat

PROMPT = (
    "Run {n}. Write a detailed story about a lighthouse keeper who finds a message in a bottle."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(env: dict, a, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "localai", "serve", "--port", str(port), "--model", a.model,
           "--ctx", str(a.ctx), "--threads", str(a.threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("localai serve exited early") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("localai serve did not start")


def via_server(port: int, token: str, a, n: int) -> dict:
    body = {"model": a.model, "stream": True, "stats": True, "temperature": 0,
            "max_tokens": a.max_tokens,
            "messages": [{"role": "user", "content": PROMPT.format(n=n)}]}  # fmt: skip
    t0, first, last, stats = stream_chat(port, token, body, "stats")
    k = stats["completion_tokens"]
    return {"completion_tokens": k, "ttft_s": first - t0,
            "tokens_per_s": (k - 1) / (last - first), "engine": stats}  # fmt: skip


def in_process(env: dict, a, n: int) -> dict:
    cmd = [sys.executable, "-m", "localai", "run", PROMPT.format(n=n), "--model", a.model,
           "-t", "0", "--max-tokens", str(a.max_tokens), "--ctx", str(a.ctx),
           "--threads", str(a.threads), "--no-daemon", "--json"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["stats"]


def main() -> None:
    ap = speed_parser()
    a = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="localai-bench-server-"))
    models = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))
    env = dict(os.environ, LOCALAI_HOME=str(home), LOCALAI_MODELS=models)
    port = free_port()
    proc = start_daemon(env, a, port)
    token = (home / "token").read_text().strip()
    server, local = [], []
    try:
        via_server(port, token, a, 0)  # warm-up: first request pays one-time page-ins
        for n in range(1, a.runs + 1):
            server.append(via_server(port, token, a, n))
            local.append(in_process(env, a, n))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    s_ttft, l_ttft = median(server, "ttft_s"), median(local, "ttft_s")
    s_tps, l_tps = median(server, "tokens_per_s"), median(local, "tokens_per_s")
    print(json.dumps({
        "bench": "server", "model": a.model, "runs": a.runs, "max_tokens": a.max_tokens,
        "ctx": a.ctx, "threads": a.threads, "machine": platform.machine(),
        "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "server": {"ttft_s": s_ttft, "tokens_per_s": s_tps,
                   "engine_ttft_s": median([r["engine"] for r in server], "ttft_s"),
                   "engine_tokens_per_s": median([r["engine"] for r in server], "tokens_per_s")},
        "in_process": {"ttft_s": l_ttft, "tokens_per_s": l_tps},
        "ttft_overhead": round(s_ttft / l_ttft - 1, 4),
        "decode_overhead": round(1 - s_tps / l_tps, 4),
        "runs_detail": {"server": server, "in_process": local},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
