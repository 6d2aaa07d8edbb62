"""What the decode-speed benchmarks (decode.py, server.py, remote.py) share: their flags, and the
median of a key over repeated runs."""

from __future__ import annotations

import argparse
import statistics


def speed_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 4)
