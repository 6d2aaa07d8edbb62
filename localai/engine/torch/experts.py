"""Where a MoE layer's experts come from: in place from the memory map (all resident, the page
cache decides), or read on demand into a RAM budget shared by all layers (`ExpertCache`).

An expert is three matrices, each a contiguous run of rows of its stacked GGUF tensor
(`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`: [X, O, I]), so loading one is three `pread`s
of its bytes as they are in the file; the kernels multiply them in their block format, the same
bytes the memory map holds, so every budget computes exactly what the all-resident run does.
Read ranges are dropped from the page cache after each read (`posix_fadvise(DONTNEED)`): the
cache's own budget is then the only RAM experts take, and a miss is a real disk read.

A store answers `store[e]` → (gate and up fused, down) as weights.QLinear, and `nbytes` (all of
the layer's expert bytes, resident or not).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .arch import Hparams
from .gguf_header import Tensor
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

    @property
    def nbytes(self) -> int:
        return sum(int(t.data.nbytes) for t in self.mats)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


class ExpertCache:
    """Experts of every layer read on demand into at most `budget` bytes, least recently used
    evicted first. `budget`: bytes, or a share of all expert bytes (`parse_budget`).
    `for_layer(i)` is layer i's store."""

    def __init__(self, w: GGUFWeights, hp: Hparams, budget: int | float | str):
        self.w, self.kernel = w, w.kernel
        self.layers = [[w.tensors[hp.name(k, i)] for k in MATRICES] for i in range(hp.n_layers)]
        self.expert_bytes = [sum(t.data.nbytes // t.shape[0] for t in m) for m in self.layers]
        self.budget = parse_budget(budget, self.total_bytes)
        self.used = 0
        self.stats = CacheStats()
        self._lru: OrderedDict[tuple[int, int], tuple] = OrderedDict()  # (layer, e) → pair
        self._fd = os.open(w.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def for_layer(self, i: int) -> CachedExperts:
        return CachedExperts(self, i)

    def get(self, layer: int, e: int) -> tuple[QLinear, QLinear]:
        key = (layer, e)
        found = self._lru.get(key)
        if found is not None:
            self._lru.move_to_end(key)
            self.stats.hits += 1
            return found
        self.stats.misses += 1
        loaded = pair([self._read(t, e) for t in self.layers[layer]], self.kernel)
        size = self.expert_bytes[layer]
        while self._lru and self.used + size > self.budget:
            old, _ = self._lru.popitem(last=False)
            self.used -= self.expert_bytes[old[0]]
            self.stats.evictions += 1
        if size <= self.budget:  # an expert larger than the whole budget is used, not kept
            self._lru[key] = loaded
            self.used += size
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
        self.stats.bytes_read += buf.nbytes
        return Tensor(where.qtype, where.shape, buf, where.offset)

    @property
    def total_bytes(self) -> int:
        """All experts of all layers: what a budget of 100% holds."""
        return sum(b * m[0].shape[0] for b, m in zip(self.expert_bytes, self.layers, strict=True))

    def info(self) -> dict:
        s = self.stats
        return {"budget_bytes": self.budget, "used_bytes": self.used, "hits": s.hits,
                "misses": s.misses, "hit_rate": round(s.hit_rate, 4),
                "bytes_read": s.bytes_read, "evictions": s.evictions}  # fmt: skip

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._lru.clear()
        self.used = 0


class CachedExperts:
    """Layer i's view of the shared cache."""

    def __init__(self, cache: ExpertCache, layer: int):
        self.cache, self.layer = cache, layer

    def __getitem__(self, e: int) -> tuple[QLinear, QLinear]:
        return self.cache.get(self.layer, e)

    @property
    def nbytes(self) -> int:
        m = self.cache.layers[self.layer]
        return self.cache.expert_bytes[self.layer] * m[0].shape[0]


def parse_budget(value: int | float | str | None, total: int) -> int | None:
    """An expert budget as bytes: None (all resident), bytes (an int, or '512M', '2GiB'), or a
    share of all expert bytes ('40%', or a float in (0, 1])."""
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
            raise ValueError(
                f"an expert budget is bytes (e.g. 2G) or a share (40%), not {value!r}"
            ) from None
    if not 0 < share <= 1:
        raise ValueError(f"an expert budget share must be in (0%, 100%], not {value!r}")
    return int(total * share)
