"""TTFT and decode speed through the remote engine against talking to the same server directly,
side by side in one run.

The server: one `localai serve` (a real remote: another process, over loopback HTTP).
direct: a streaming /v1/chat/completions request to it (http.client), timed by the client:
        request sent → first content chunk; decode tokens/s = (completion_tokens - 1) over the
        time from the first to the last chunk.
engine: the same chat through RemoteEngine in this process (what `localai run --engine remote`
        and `localai ask` do), timed alike from the call to the first and last Delta; the time
        includes what the engine does first (the server's template, the context check).
front:  the same chat to a second `localai serve` whose engine is remote (what the TUI and
        editors go through: two HTTP hops), timed as `direct`.
Runs alternate (direct engine front, ...) so machine noise hits all alike; every request's
prompt carries its run and path, so the server reuses no KV prefix beyond the system prompt.
Prints one JSON object: medians and the ratios (goal: ≥ 0.95 of direct for tok/s, and for TTFT
direct / path ≥ 0.95).

    python bench/remote.py [--model smollm2-135m] [--runs 5] [--max-tokens 128]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from server import PROMPT, free_port, start_daemon  # bench/ is on the path when run
from speed_args import median, speed_parser, stream_chat

from localai.engine import Delta, Done, Message, SamplingParams
from localai.engine.remote import RemoteEngine


def via_http(port: int, token: str, a, prompt: str) -> dict:
    body = {"model": a.model, "stream": True, "temperature": 0, "max_tokens": a.max_tokens,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    cpu0 = time.process_time()
    t0, first, last, usage = stream_chat(port, token, body, "usage")
    return _row(usage["completion_tokens"], t0, first, last, cpu0)


def via_engine(engine: RemoteEngine, a, prompt: str) -> dict:
    """As `chat(engine, ...)`, with the template step timed apart: `prepare_s` is what the
    engine adds before its request is sent, a number the machine's noise barely moves."""
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    t0, cpu0 = time.perf_counter(), time.process_time()
    rendered = engine.apply_chat_template([Message("user", prompt)])
    prepare_s = time.perf_counter() - t0
    first = last = None
    for ev in engine.generate(rendered, params):
        if isinstance(ev, Delta):
            last = time.perf_counter()
            first = first or last
        elif isinstance(ev, Done):
            k = ev.stats.completion_tokens
    return _row(k, t0, first, last, cpu0) | {"prepare_s": round(prepare_s, 5)}


def _row(k: int, t0: float, first: float, last: float, cpu0: float) -> dict:
    """One request's numbers; `client_cpu_ms_per_token`: this process's CPU time per token
    (the client's own work: HTTP, SSE, and in the engine path everything the engine does)."""
    cpu_ms = (time.process_time() - cpu0) * 1000 / k
    return {"completion_tokens": k, "ttft_s": round(first - t0, 4),
            "tokens_per_s": round((k - 1) / (last - first), 2),
            "client_cpu_ms_per_token": round(cpu_ms, 3)}  # fmt: skip


def main() -> None:
    ap = speed_parser()
    a = ap.parse_args()
    models = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))
    up_home = Path(tempfile.mkdtemp(prefix="localai-bench-remote-"))
    env = dict(os.environ, LOCALAI_HOME=str(up_home), LOCALAI_MODELS=models)
    up_port = free_port()
    up = start_daemon(env, a, up_port)
    token = (up_home / "token").read_text().strip()
    url = f"http://127.0.0.1:{up_port}"
    front_home = Path(tempfile.mkdtemp(prefix="localai-bench-front-"))
    (front_home / "config.toml").write_text(
        f'engine = "remote"\nremote_url = "{url}"\nremote_api_key = "{token}"\n'
    )
    front_env = dict(env, LOCALAI_HOME=str(front_home))
    front_port = free_port()
    front = start_daemon(front_env, a, front_port)
    front_token = (front_home / "token").read_text().strip()
    engine = RemoteEngine(url, token, a.model, log=lambda _m: None)
    rows: dict[str, list[dict]] = {"direct": [], "engine": [], "front": []}
    paths = {
        "direct": lambda p: via_http(up_port, token, a, p),
        "engine": lambda p: via_engine(engine, a, p),
        "front": lambda p: via_http(front_port, front_token, a, p),
    }
    try:
        for name, run in paths.items():  # warm-up: page-ins, connections, the tokenizer
            run(PROMPT.format(n=f"0{name}"))
        for n in range(1, a.runs + 1):
            for name, run in paths.items():
                rows[name].append(run(PROMPT.format(n=f"{n}{name}")))
    finally:
        engine.close()
        for proc in (front, up):
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(report(a, rows)))


def report(a, rows: dict[str, list[dict]]) -> dict:
    med = {k: {"ttft_s": median(v, "ttft_s"), "tokens_per_s": median(v, "tokens_per_s")}
           for k, v in rows.items()}  # fmt: skip
    med["engine"]["prepare_s"] = median(rows["engine"], "prepare_s")
    for k in ("direct", "engine"):  # the front's work is in another process
        med[k]["client_cpu_ms_per_token"] = median(rows[k], "client_cpu_ms_per_token")
    d = med["direct"]
    ratios = {k: {"tokens_per_s": round(m["tokens_per_s"] / d["tokens_per_s"], 3),
                  "ttft": round(d["ttft_s"] / m["ttft_s"], 3)}
              for k, m in med.items() if k != "direct"}  # fmt: skip
    # the same, run by run against the direct request made just before (less drift between
    # the two), then the median of those ratios
    paired = {k: {"tokens_per_s": _paired(rows, k, "tokens_per_s", lambda p, d: p / d),
                  "ttft": _paired(rows, k, "ttft_s", lambda p, d: d / p)}
              for k in rows if k != "direct"}  # fmt: skip
    return {"bench": "remote", "model": a.model, "runs": a.runs, "max_tokens": a.max_tokens,
            "ctx": a.ctx, "threads": a.threads, "machine": platform.machine(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "load_average": os.getloadavg(), **med, "ratio_vs_direct": ratios,
            "paired_ratio_vs_direct": paired, "runs_detail": rows}  # fmt: skip


def _paired(rows: dict[str, list[dict]], path: str, key: str, ratio) -> float:
    pairs = zip(rows[path], rows["direct"], strict=True)
    return round(statistics.median(ratio(p[key], d[key]) for p, d in pairs), 3)


if __name__ == "__main__":
    main()
