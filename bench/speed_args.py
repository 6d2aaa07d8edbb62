"""What the decode-speed benchmarks (decode.py, server.py, remote.py) share: their flags, and the
median of a key over repeated runs."""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time


def speed_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def stream_chat(port: int, token: str, body: dict, key: str) -> tuple[float, float, float, dict]:
    """POST a streaming chat completion to 127.0.0.1:`port`; returns (start, first content chunk,
    last content chunk) as perf_counter times, and the last value of each chunk's `key` (usage,
    or localai's stats)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    first = last = None
    found = {}
    for raw in conn.getresponse():
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
        if delta.get("content"):
            last = time.perf_counter()
            first = first or last
        found = chunk.get(key) or found
    conn.close()
    return t0, first, last, found


def median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 4)
