"""The RAM budget and who holds what of it, and what gives memory back when the system runs short.

One process-wide ledger: model weights, KV cache, the expert cache and the index each reserve
bytes under a holder name; `status`, `ps` and the dashboard read the snapshot. The governor
does not allocate anything itself. A reservation past the budget raises, so a component learns
it must shrink (a smaller context, fewer cached experts) before it allocates, not after.

Holders that can give memory back register a `Shrinkable` (how many bytes it holds now, and a
callback that frees what it can and says how much). Under pressure (pressure.py) the governor
calls them in SHRINK_ORDER, cheapest loss first, and stops as soon as one pass freed enough:

1. "caches"  — the passage read-back cache, the index's in-RAM vectors, the kept prompt heads'
   KV snapshots (engine/prefix.py; their files stay): rebuilt or re-read on next use;
2. "experts" — the expert cache, down to its floor (the torch runner's MoE cache, when loaded);
3. "models"  — an idle model (no request in flight), reloaded by the next request.

A callback must never take memory a request in flight is using: a model with a request in
flight refuses, and the request ends normally.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SHRINK_ORDER = ("caches", "experts", "models")


class BudgetError(MemoryError):
    pass


def give_back_freed() -> None:
    """Return the heap memory this process has freed to the OS. glibc keeps freed memory to
    reuse (a large block freed raises its threshold for using mmap, so later blocks of that size
    come from the heap and stay in RSS after they are freed): after a long prompt's chunks the
    runner's RSS held ~44 MiB of it at 16K (BENCHMARKS.md, "KV pages on disk"). No-op off
    glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def physical_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@dataclass
class Shrinkable:
    """A holder that can give memory back: `shrink()` frees what it can without harming a
    request in flight and returns the bytes freed; `size()` is what it holds now, for holders
    that do not `reserve` their bytes in the ledger themselves."""

    name: str
    stage: str  # one of SHRINK_ORDER
    shrink: Callable[[], int]
    size: Callable[[], int] | None = None


class Governor:
    def __init__(self, budget_bytes: int | None = None):
        self.total_ram = physical_ram_bytes()
        self.budget = budget_bytes or int(self.total_ram * 0.75)
        self._held: dict[str, int] = {}
        self._shrinkable: dict[str, Shrinkable] = {}
        self._lock = threading.Lock()
        self._shrink_lock = threading.Lock()  # one shrink pass at a time
        self.events: deque[dict] = deque(maxlen=16)  # pressure events that freed something
        self.pressure_state: dict | None = None  # the last reading (pressure.py)

    def reserve(self, holder: str, nbytes: int) -> None:
        """Set `holder`'s share to `nbytes` (replacing its previous share)."""
        with self._lock:
            others = sum(v for k, v in self._held.items() if k != holder)
            if others + nbytes > self.budget:
                raise BudgetError(
                    f"{holder} needs {nbytes / 2**20:,.0f} MiB but only "
                    f"{(self.budget - others) / 2**20:,.0f} MiB of the "
                    f"{self.budget / 2**30:.1f} GiB RAM budget is free; "
                    "lower the context length or raise ram_budget_bytes"
                )
            self._held[holder] = nbytes

    def release(self, holder: str) -> None:
        with self._lock:
            self._held.pop(holder, None)

    def left(self, holders: tuple[str, ...]) -> int:
        """The budget less what every holder but `holders` holds: what those may take."""
        held = self.snapshot()["holders"]
        return self.budget - sum(n for name, n in held.items() if name not in holders)

    def register(self, holder: Shrinkable) -> None:
        assert holder.stage in SHRINK_ORDER, holder.stage
        with self._lock:
            self._shrinkable[holder.name] = holder

    def _sizes(self) -> dict[str, int]:
        """Bytes of each registered holder that measures itself (a broken one counts 0)."""
        with self._lock:
            holders = [h for h in self._shrinkable.values() if h.size is not None]
        out = {}
        for h in holders:
            try:
                out[h.name] = int(h.size())
            except Exception:  # noqa: BLE001  (a size is for display; never fail a snapshot)
                out[h.name] = 0
        return out

    @property
    def last_pressure(self) -> dict | None:
        return self.events[-1] if self.events else None

    def shrink(self, need_bytes: int, reason: str, log=print, quiet: bool = False) -> dict:
        """Free at least `need_bytes` if it can, stage by stage in SHRINK_ORDER; returns the
        event (what each holder freed). Events that freed something, or that start an episode
        of pressure (`quiet` False), are kept in `events` and logged."""
        with self._shrink_lock:
            with self._lock:
                holders = sorted(self._shrinkable.values(),
                                 key=lambda h: SHRINK_ORDER.index(h.stage))  # fmt: skip
            freed: dict[str, int] = {}
            total = 0
            for stage in SHRINK_ORDER:
                for h in (h for h in holders if h.stage == stage):
                    try:
                        got = int(h.shrink())
                    except Exception as e:  # noqa: BLE001  (one holder must not stop the rest)
                        log(f"memory pressure: {h.name} could not shrink: {e}")
                        continue
                    if got:
                        freed[h.name] = got
                        total += got
                if total >= need_bytes:
                    break
            if total:
                give_back_freed()
            event = {"at": time.time(), "reason": reason, "need_bytes": need_bytes,
                     "freed_bytes": total, "freed": freed}  # fmt: skip
            if quiet and not total:
                return event
            self.events.append(event)
        what = ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in freed.items()) or "nothing"
        log(f"memory pressure ({reason}): freed {what}")
        return event

    def snapshot(self) -> dict:
        sizes = self._sizes()
        with self._lock:
            held = dict(self._held)
            stages = {n: h.stage for n, h in self._shrinkable.items()}
        for name, n in sizes.items():
            held[name] = max(held.get(name, 0), n)
        return {
            "total_ram_bytes": self.total_ram,
            "budget_bytes": self.budget,
            "held_bytes": sum(held.values()),
            "holders": held,
            "shrink_order": {st: [n for n, s in stages.items() if s == st] for st in SHRINK_ORDER},
            "pressure": self.pressure_state,
            "last_pressure": self.last_pressure,
            "pressure_events": list(self.events),
        }
