"""Where a MoE layer's experts come from: in place from the memory map (all resident, the page
cache decides), or read on demand into a RAM budget shared by all layers (`ExpertCache`).

An expert is three matrices, each a contiguous run of rows of its stacked GGUF tensor
(`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`: [X, O, I]), so loading one is three `pread`s
of its bytes as they are in the file; the kernels multiply them in their block format, the same
bytes the memory map holds, so every budget computes exactly what the all-resident run does.
Read ranges are dropped from the page cache after each read (`posix_fadvise(DONTNEED)`): the
cache's own budget is then the only RAM experts take, and a miss is a real disk read.

A store answers `store[e]` → (gate and up fused, down) as weights.QLinear, `store.fetch(ids)` →
{e: a future of that pair} (a cache reads the misses in parallel), and `nbytes` (all of the
layer's expert bytes, resident or not); a cache's store also takes `prefetch(ids)`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .arch import Hparams
from .gguf_header import Tensor
from .routing import Eviction
from .weights import GGUFWeights, QLinear

# X experts, O output rows, I input columns

MATRICES = ("gate_exps", "up_exps", "down_exps")


def expert_slice(t: Tensor, e: int) -> Tensor:
    """Expert e's matrix of a stacked [X, O, I] tensor: its O rows, a view of the memory map
    (no page is read until used), with their offset in the file."""
    o = t.shape[1]
    return Tensor(
        t.qtype, t.shape[1:], t.data[e * o : (e + 1) * o], t.offset + e * o * t.data.shape[1]
    )


def pair(mats: list[Tensor], kernel) -> tuple[QLinear, QLinear]:
    """(gate + up, down) for one expert's three matrices."""
    return QLinear(mats[:2], kernel), QLinear(mats[2:], kernel)


class ResidentExperts:
    """One layer's experts in place in the memory map, made on first use (no copy)."""

    def __init__(self, w: GGUFWeights, hp: Hparams, i: int):
        self.mats = [w.tensors[hp.name(k, i)] for k in MATRICES]  # X, F, E; X, F, E; X, E, F
        self.kernel = w.kernel
        self._made: dict[int, tuple[QLinear, QLinear]] = {}

    def __getitem__(self, e: int) -> tuple[QLinear, QLinear]:
        if e not in self._made:
            self._made[e] = pair([expert_slice(t, e) for t in self.mats], self.kernel)
        return self._made[e]

    def fetch(self, ids: list[int]) -> dict[int, Future]:
        return {e: _done(self[e]) for e in ids}

    def prefetch(self, ids: list[int]) -> None:
        """Nothing to read ahead: every expert is in place."""

    def score_prediction(self, ids: list[int]) -> None:
        """No predictions made, none to score."""

    @property
    def nbytes(self) -> int:
        return sum(int(t.data.nbytes) for t in self.mats)


@dataclass
class CacheStats:
    hits: int = 0  # found in RAM, or already on its way (a prefetch in flight)
    misses: int = 0  # read when asked for
    bytes_read: int = 0  # by misses and prefetches
    evictions: int = 0
    prefetched: int = 0  # reads started ahead of use (`prefetch`)
    prefetch_used: int = 0  # of those, asked for before they were evicted
    predicted: int = 0  # experts a layer's router, applied a layer early, named
    routed: int = 0  # experts the layers then chose (the k per token of one-token steps)
    predicted_right: int = 0  # in both

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


def prediction_scores(d: dict) -> dict:
    """Prefetch precision (predicted experts the next layer chose) and recall (chosen experts
    that were predicted) from CacheStats counts (`d`: asdict, or a difference of two)."""
    return {"prefetch_precision": round(d["predicted_right"] / max(1, d["predicted"]), 4),
            "prefetch_recall": round(d["predicted_right"] / max(1, d["routed"]), 4)}  # fmt: skip


class ExpertCache:
    """Experts of every layer read on demand into at most `budget` bytes, evicted by `policy`
    (routing.POLICIES; default "freq": the most asked-for stay, an expert asked for less often
    than every held one is read for its use only; LRU evicts each expert just before its next
    use once the budget is below one token's experts, and reads 16-22% more at 25-75% on a
    routing trace with locality: BENCHMARKS.md). `budget`: bytes, or a share of all expert
    bytes (`parse_budget`). `for_layer(i)` is layer i's store.

    Reads run on `io_threads` background threads: a layer's misses are read in parallel (a disk
    serves several reads at once faster than one after another: 0.6 → 0.8-1.1 GB/s measured here
    with 2.6 MB reads), and `prefetch` starts reading the next layer's likely experts while this
    one computes. An expert counts against the budget from the moment its read starts; only the
    experts a layer holds while it computes, if evicted meanwhile, are over it, for that long.
    What is read is the file's bytes whatever the order or the thread,
    so prefetching changes when an expert arrives, never what is computed."""

    def __init__(self, w: GGUFWeights, hp: Hparams, budget: int | float | str, io_threads: int = 4,
                 policy: str = "freq"):  # fmt: skip
        self.w, self.kernel = w, w.kernel
        self.layers = [[w.tensors[hp.name(k, i)] for k in MATRICES] for i in range(hp.n_layers)]
        self.expert_bytes = [sum(t.data.nbytes // t.shape[0] for t in m) for m in self.layers]
        self.budget = parse_budget(budget, self.total_bytes)
        self.k = hp.n_experts_used
        self.used = 0
        self.stats = CacheStats()
        # (layer, e) → a future of (gate + up, down): read, or being read
        self._held: dict[tuple[int, int], Future] = {}
        self._policy = Eviction(policy)  # which of them goes out to make room
        self._ahead: set[tuple[int, int]] = set()  # prefetched, not asked for yet
        # predictions the policy would not admit, read outside the budget for the ask that
        # should follow (one layer's at most: dropped when that layer asks)
        self._side: dict[tuple[int, int], Future] = {}
        self._predicted: dict[int, set[int]] = {}  # layer → experts predicted for its next step
        self._lock = threading.RLock()  # RLock: a finished read's callback may run in `_want`
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="localai-experts")
        self._fd = os.open(w.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def for_layer(self, i: int) -> CachedExperts:
        return CachedExperts(self, i)

    def fetch(self, layer: int, ids: list[int]) -> dict[int, Future]:
        """Layer `layer`'s experts `ids`: each a future of its (gate + up, down); the misses are
        all read at once on the I/O threads. Holding the futures keeps the experts alive while
        the layer computes, even if later reads evict them from the cache."""
        with self._lock:
            got = {e: self._want((layer, e), ahead=False) for e in ids}
            for key in [k for k in self._side if k[0] == layer]:  # predicted, not asked for
                del self._side[key]
                self._ahead.discard(key)
            return got

    def get(self, layer: int, e: int) -> tuple[QLinear, QLinear]:
        return self.fetch(layer, [e])[e].result()

    def prefetch(self, layer: int, ids: list[int]) -> None:
        """Start reading `ids` of `layer`, predicted to be asked for next: a wrong guess costs
        disk bandwidth and cache room, never a different result."""
        with self._lock:
            self._predicted[layer] = set(ids)
            for e in ids:
                self._want((layer, e), ahead=True)

    def score_prediction(self, layer: int, ids: list[int]) -> None:
        """Count how the last prediction for `layer` compares with the experts it chose."""
        with self._lock:
            guess = self._predicted.pop(layer, None)
            if guess is None:
                return
            s = self.stats
            s.predicted, s.routed = s.predicted + len(guess), s.routed + len(ids)
            s.predicted_right += len(guess.intersection(ids))

    def _want(self, key: tuple[int, int], ahead: bool) -> Future:
        """A future of `key` (the lock held): the cached expert, or its read in flight, or a new
        read. A new read takes its room (evicting by the policy) when it starts, so the budget
        bounds reads in flight too, and the policy sees the asks in their order (as
        routing.replay does), whichever read finishes first. Predictions are not asks: they
        neither count nor refresh; one the policy would not admit is read beside the budget for
        the ask that should follow."""
        if not ahead:
            self._policy.ask(key)
        found = self._held.get(key)
        if found is not None:
            self._count_hit(key, ahead)
            return found
        side = self._side.get(key) if ahead else self._side.pop(key, None)
        if ahead and side is not None:
            return side
        size = self.expert_bytes[key[0]]
        admit = size <= self.budget  # an expert larger than the whole budget is used, not kept
        while admit and self._held and self.used + size > self.budget:
            old = self._policy.victim(key)
            admit = old is not None
            if admit:
                self._evict(old)
        if side is not None:  # predicted and read beside the budget: on its way, a hit
            self._count_hit(key, ahead)
            fut = side
        else:
            if ahead:
                self.stats.prefetched += 1
                self._ahead.add(key)
            else:
                self.stats.misses += 1
            fut = self._io.submit(self._load, key)
        if admit:
            self._held[key] = fut
            self._policy.insert(key)
            self.used += size
            fut.add_done_callback(functools.partial(self._drop_failed, key))
        elif ahead:
            self._side[key] = fut
        return fut

    def _evict(self, key: tuple[int, int]) -> None:
        del self._held[key]
        self._policy.remove(key)
        self.used -= self.expert_bytes[key[0]]
        self.stats.evictions += 1
        self._ahead.discard(key)

    def _drop_failed(self, key: tuple[int, int], fut: Future) -> None:
        """A failed read leaves the cache (asked again, it is read again); only its own entry,
        since the key may have been evicted and asked for again while it was read."""
        if fut.cancelled() or fut.exception() is None:
            return
        with self._lock:
            if self._held.get(key) is fut:
                del self._held[key]
                self._policy.remove(key)
                self.used -= self.expert_bytes[key[0]]
                self._ahead.discard(key)

    def _count_hit(self, key: tuple[int, int], ahead: bool) -> None:
        if ahead:
            return  # a prediction of what is here already: nothing to count
        self.stats.hits += 1
        if key in self._ahead:
            self._ahead.discard(key)
            self.stats.prefetch_used += 1

    def _load(self, key: tuple[int, int]) -> tuple[QLinear, QLinear]:
        """Read one expert (on an I/O thread); a failure is the future's (`_drop_failed`)."""
        layer, e = key
        loaded = pair([self._read(t, e) for t in self.layers[layer]], self.kernel)
        with self._lock:
            self.stats.bytes_read += self.expert_bytes[layer]
        return loaded

    def _read(self, t: Tensor, e: int) -> Tensor:
        """Expert e's rows of `t` read from the file into memory of their own (the memory map's
        view only says where they are)."""
        where = expert_slice(t, e)
        buf = np.empty(where.data.shape, dtype=np.uint8)
        got = os.preadv(self._fd, [buf], where.offset)
        if got != buf.nbytes:
            raise OSError(f"{self.w.path}: short read of an expert ({got} of {buf.nbytes} bytes)")
        if hasattr(os, "posix_fadvise"):  # the budget, not the page cache, holds experts
            os.posix_fadvise(self._fd, where.offset, buf.nbytes, os.POSIX_FADV_DONTNEED)
        return Tensor(where.qtype, where.shape, buf, where.offset)

    @property
    def total_bytes(self) -> int:
        """All experts of all layers: what a budget of 100% holds."""
        return sum(b * m[0].shape[0] for b, m in zip(self.expert_bytes, self.layers, strict=True))

    def shrink(self, budget: int) -> int:
        """Lower the budget to `budget` bytes (memory pressure), evicting by the policy; the
        bytes given back. Safe while a step runs: a layer holds the experts it computes
        with, and an expert evicted mid-step is read again when next asked for."""
        with self._lock:
            before, self.budget = self.used, min(self.budget, max(0, budget))
            while self._held and self.used > self.budget:
                self._evict(self._policy.victim())
            return before - self.used

    @property
    def floor(self) -> int:
        """The smallest useful budget: one token's experts in every layer (k per layer)."""
        return sum(b * self.k for b in self.expert_bytes)

    def info(self) -> dict:
        with self._lock:
            s = dataclasses.asdict(self.stats)
            used = self.used
        return {
            "policy": self._policy.policy,
            "budget_bytes": self.budget,
            "used_bytes": used,
            "hit_rate": round(s["hits"] / max(1, s["hits"] + s["misses"]), 4),
            **s,
            **prediction_scores(s),
        }

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._held.clear()
        self._side.clear()
        self._policy.clear()
        self.used = 0


def _done(value) -> Future:
    f = Future()
    f.set_result(value)
    return f


class CachedExperts:
    """Layer i's view of the shared cache."""

    def __init__(self, cache: ExpertCache, layer: int):
        self.cache, self.layer = cache, layer

    def __getitem__(self, e: int) -> tuple[QLinear, QLinear]:
        return self.cache.get(self.layer, e)

    def fetch(self, ids: list[int]) -> dict[int, Future]:
        return self.cache.fetch(self.layer, ids)

    def prefetch(self, ids: list[int]) -> None:
        self.cache.prefetch(self.layer, ids)

    def score_prediction(self, ids: list[int]) -> None:
        self.cache.score_prediction(self.layer, ids)

    @property
    def nbytes(self) -> int:
        m = self.cache.layers[self.layer]
        return self.cache.expert_bytes[self.layer] * m[0].shape[0]


def parse_budget(
    value: int | float | str | None, total: int, what: str = "an expert budget"
) -> int | None:
    """An expert budget as bytes: None (all resident), bytes (an int, or '512M', '2GiB'), or a
    share of all expert bytes ('40%', or a float in (0, 1]). Also a token budget (attention:
    4096, 4K, or a share of the context)."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    share = value
    if isinstance(value, str):
        v = value.strip().upper()
        try:
            if v.endswith("%"):
                share = float(v[:-1]) / 100
            else:
                v = v.removesuffix("IB").removesuffix("B")
                units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
                mult = units.get(v[-1:], 1)
                return int(float(v[:-1] if v[-1:] in units else v) * mult)
        except ValueError:
            msg = f"{what} is a size (e.g. 2G) or a share (40%), not {value!r}"
            raise ValueError(msg) from None
    if not 0 < share <= 1:
        raise ValueError(f"{what} share must be in (0%, 100%], not {value!r}")
    return int(total * share)
