"""The RAM budget and who holds what of it.

One process-wide ledger: model weights, KV cache, (later) the expert cache and the index each
reserve bytes under a holder name; `status` and the dashboard read the snapshot. The governor
does not allocate anything itself. A reservation past the budget raises, so a component learns
it must shrink (a smaller context, fewer cached experts) before it allocates, not after.
"""

from __future__ import annotations

import threading
from pathlib import Path


class BudgetError(MemoryError):
    pass


def physical_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class Governor:
    def __init__(self, budget_bytes: int | None = None):
        self.total_ram = physical_ram_bytes()
        self.budget = budget_bytes or int(self.total_ram * 0.75)
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

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

    def snapshot(self) -> dict:
        with self._lock:
            held = dict(self._held)
        return {
            "total_ram_bytes": self.total_ram,
            "budget_bytes": self.budget,
            "held_bytes": sum(held.values()),
            "holders": held,
        }
