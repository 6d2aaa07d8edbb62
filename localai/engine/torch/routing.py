"""Routing traces of a MoE model, and their replay into hit-rate curves.

A trace is what the expert cache sees, in the order it sees it: for each MoE layer call, the
experts each token chose. `--trace-routing FILE` writes one as JSON lines: a header
{"model", "layers", "experts", "experts_used", "expert_bytes"}, then one line per (call, layer)
{"layer": i, "experts": [[e, ...] per token]}. Replaying it through a policy at each cache size
gives the hit rate that size would have had on that workload (`curve`), so the budget and the
policy can be chosen from a user's own traffic before a byte is read.

Policies (capacity in experts, every expert of a model the same size):
- "lru": least recently used out first;
- "lfu": least frequently used out first (ties: least recent);
- "decay": counts halved every `half_life` lookups, then as lfu (recent popularity);
- "freq": as lfu, but an expert's count outlives its eviction, and an expert used less often
  than the least used held one is read for that use only, not admitted (the most used stay).
  A token reads layers × top-k experts in the same order each step: when the cache holds fewer,
  the three above evict each expert just before its next use and hit almost never (BENCHMARKS.md,
  "a routing trace with locality"); counts that survive eviction keep the hottest ones instead.
The live cache (experts.ExpertCache, default "freq") evicts with the same code (`Eviction`),
so a replay at its size gives its hits and misses exactly.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from pathlib import Path

POLICIES = ("lru", "lfu", "decay", "freq")
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


class Eviction:
    """Which experts a cache holds, and which goes out to make room, under one of `POLICIES`.
    The live expert cache (experts.ExpertCache) and `replay` share it, so a replay is what the
    cache would have done. Keys are (layer, expert); every expert takes one slot."""

    def __init__(self, policy: str = "freq", half_life: int = 4096):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.policy, self.half_life = policy, half_life
        self.counts: dict[tuple[int, int], float] = {}  # held keys ("freq": every key asked)
        self.held: dict[tuple[int, int], int] = {}  # key → the stamp of its last touch
        self.heap: list[tuple[float, int, tuple[int, int]]] = []  # (count, stamp, key); stale kept
        self.asks = self.stamp = 0
        self.scale = 1.0  # decay: an ask counts `scale`; scale doubles every half-life

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.held

    def __len__(self) -> int:
        return len(self.held)

    def ask(self, key: tuple[int, int]) -> None:
        """Routing asked for `key` (held or not): its count and recency, before any `victim`."""
        if self.policy == "decay" and self.asks and self.asks % self.half_life == 0:
            self.scale *= 2.0
            if self.scale > 1e200:  # keep the numbers finite: only their ratios matter
                self.counts = {k: c / self.scale for k, c in self.counts.items()}
                self.scale = 1.0
                self._reheap()
        self.asks += 1
        if key in self.held or self.policy == "freq":
            self.counts[key] = self.counts.get(key, 0.0) + self.scale
        if key in self.held:
            self._push(key)

    def victim(self, key: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """The held key to evict so that `key` can come in (the least counted, of equals the
        least recent; "lru": the least recent), or None: nothing held, or ("freq") `key` is
        asked for less often than every held key and is not to be admitted. key=None: the one
        to evict whatever comes."""
        while self.heap:
            count, stamp, old = self.heap[0]
            if self.held.get(old) != stamp:  # stale: touched since, or evicted
                heapq.heappop(self.heap)
            elif self.policy == "freq" and key is not None and self.counts.get(key, 0.0) <= count:
                return None
            else:
                return old
        return None

    def insert(self, key: tuple[int, int]) -> None:
        if self.policy != "freq":
            self.counts[key] = self.scale  # 1 but for "decay"
        self._push(key)

    def remove(self, key: tuple[int, int]) -> None:
        del self.held[key]
        if self.policy != "freq":
            del self.counts[key]

    def clear(self) -> None:
        self.held.clear()
        self.heap.clear()
        if self.policy != "freq":
            self.counts.clear()

    def _push(self, key: tuple[int, int]) -> None:
        self.stamp += 1
        self.held[key] = self.stamp
        count = 0.0 if self.policy == "lru" else self.counts.get(key, 0.0)
        heapq.heappush(self.heap, (count, self.stamp, key))
        if len(self.heap) > 4 * len(self.held) + 64:  # drop the stale entries
            self._reheap()

    def _reheap(self) -> None:
        lru = self.policy == "lru"
        self.heap = [(0.0 if lru else self.counts.get(k, 0.0), t, k) for k, t in self.held.items()]
        heapq.heapify(self.heap)


def replay(lookups: Iterable[tuple[int, int]], capacity: int, policy: str = "lru",
           half_life: int = 4096) -> dict:  # fmt: skip
    """Hits and misses of a cache holding `capacity` experts under `policy`."""
    held = Eviction(policy, half_life)
    hits = misses = 0
    for key in lookups:
        held.ask(key)
        if key in held:
            hits += 1
            continue
        misses += 1
        admit = capacity > 0
        while admit and len(held) >= capacity:
            old = held.victim(key)
            admit = old is not None
            if admit:
                held.remove(old)
        if admit:
            held.insert(key)
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
