"""Routing traces of a MoE model, and their replay into hit-rate curves.

A trace is what the expert cache sees, in the order it sees it: for each MoE layer call, the
experts each token chose. `--trace-routing FILE` writes one as JSON lines: a header
{"model", "layers", "experts", "experts_used", "expert_bytes"}, then one line per (call, layer)
{"layer": i, "experts": [[e, ...] per token]}. Replaying it through a policy at each cache size
gives the hit rate that size would have had on that workload (`curve`), so the budget and the
policy can be chosen from a user's own traffic before a byte is read.

Policies (capacity in experts, every expert of a model the same size):
- "lru": least recently used out first (what ExpertCache does; replay equals the live counts);
- "lfu": least frequently used out first (ties: least recent);
- "decay": counts halved every `half_life` lookups, then as lfu (recent popularity).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

POLICIES = ("lru", "lfu", "decay")
SHARES = (0.05, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0)


class TraceWriter:
    """Appends one model's routing to a JSON-lines file (see the module docstring)."""

    def __init__(self, path: Path, header: dict):
        self.file = open(path, "w")  # noqa: SIM115 (closed by close())
        self.file.write(json.dumps(header) + "\n")

    def record(self, layer: int, ids) -> None:
        """ids: [C, K] experts chosen by C tokens at `layer`, most probable first."""
        self.file.write(json.dumps({"layer": layer, "experts": ids.tolist()}) + "\n")

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def read_trace(path: Path) -> tuple[dict, list[tuple[int, int]]]:
    """(header, lookups): every (layer, expert) lookup in order, as the cache makes them (each
    expert once per call, in the order the FFN asks: ascending id)."""
    with open(path) as f:
        header = json.loads(f.readline())
        lookups = []
        for line in f:
            row = json.loads(line)
            chosen = sorted({e for token in row["experts"] for e in token})
            lookups += [(row["layer"], e) for e in chosen]
    return header, lookups


def replay(lookups: Iterable[tuple[int, int]], capacity: int, policy: str = "lru",
           half_life: int = 4096) -> dict:  # fmt: skip
    """Hits and misses of a cache holding `capacity` experts under `policy`."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    held: OrderedDict[tuple[int, int], float] = OrderedDict()  # key → count, in recency order
    hits = misses = 0
    scale = 1.0  # decay: a new lookup counts `scale`; scale doubles every half-life
    for n, key in enumerate(lookups):
        if policy == "decay" and n and n % half_life == 0:
            scale *= 2.0
            if scale > 1e200:  # keep the numbers finite: only their ratios matter
                held = OrderedDict((k, c / scale) for k, c in held.items())
                scale = 1.0
        weight = scale if policy == "decay" else 1.0
        if key in held:
            hits += 1
            held[key] += weight
            held.move_to_end(key)
            continue
        misses += 1
        if capacity <= 0:
            continue
        if len(held) >= capacity:
            if policy == "lru":
                held.popitem(last=False)
            else:  # the least counted; among equals the least recent (first in order)
                victim = min(held, key=held.__getitem__)
                del held[victim]
        held[key] = weight
    total = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": round(hits / total, 4) if total else 0.0}


def curve(path: Path, shares: Iterable[float] = SHARES,
          policies: Iterable[str] = POLICIES) -> dict:  # fmt: skip
    """Hit rate per policy at each cache size (a share of all the model's experts)."""
    header, lookups = read_trace(path)
    total = header["layers"] * header["experts"]
    rows = []
    for share in shares:
        cap = max(1, round(total * share))
        row = {"share": share, "experts": cap}
        for p in policies:
            row[p] = replay(lookups, cap, p)["hit_rate"]
        rows.append(row)
    return {"trace": str(path), "model": header.get("model"), "lookups": len(lookups),
            "distinct": len(set(lookups)), "total_experts": total, "curve": rows}  # fmt: skip
