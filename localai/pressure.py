"""Watching the rest of the machine: when the system runs short of memory, the daemon gives some
back (governor.Governor.shrink) before the kernel starts swapping or killing.

A background thread reads, every `pressure_interval`, MemAvailable from /proc/meminfo (what
could be allocated without swapping) and, where the kernel has PSI, the share of the last 10 s
in which some task stalled waiting for memory (/proc/pressure/memory, "some avg10"). Pressure
is MemAvailable under `pressure_min_available_bytes`, or avg10 over `pressure_psi_avg10`. Both
paths are settings, so a test can write a file that reports low memory.

The watcher only asks; it never frees anything itself, and the holders it asks never take
memory from a request in flight (governor.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .config import Settings
from .governor import Governor

FLOOR, CEILING = 256 << 20, 2 << 30  # the default threshold: 10% of RAM, within these


def min_available(settings: Settings, total_ram: int) -> int:
    if settings.pressure_min_available_bytes is not None:
        return settings.pressure_min_available_bytes
    return max(FLOOR, min(CEILING, total_ram // 10))


def mem_available(path: Path) -> int | None:
    """MemAvailable in bytes, or None when the file does not say."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def psi_some_avg10(path: Path) -> float | None:
    """The "some avg10" of a PSI file (percent), or None where the kernel has no PSI."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("some "):
                fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
                return float(fields["avg10"])
    except (OSError, ValueError, KeyError):
        pass
    return None


class PressureWatch:
    """The background thread; `check()` is one reading (and, under pressure, one shrink pass)."""

    def __init__(self, governor: Governor, settings: Settings, log=print):
        self.governor, self.log = governor, log
        self.meminfo, self.psi = settings.meminfo_path, settings.psi_path
        self.interval = settings.pressure_interval_s or 2.0
        self.min_available = min_available(settings, governor.total_ram)
        self.psi_limit = settings.pressure_psi_avg10
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_episode = False

    def check(self) -> dict:
        avail, psi = mem_available(self.meminfo), psi_some_avg10(self.psi)
        low = avail is not None and avail < self.min_available
        stalled = psi is not None and psi > self.psi_limit
        reading = {"at": time.time(), "available_bytes": avail, "psi_some_avg10": psi,
                   "min_available_bytes": self.min_available, "psi_limit": self.psi_limit,
                   "under_pressure": low or stalled}  # fmt: skip
        self.governor.pressure_state = reading
        if not (low or stalled):
            self._in_episode = False
            return reading
        if low:
            reason = (f"{avail / 2**20:,.0f} MiB available, under "
                      f"{self.min_available / 2**20:,.0f} MiB")  # fmt: skip
        else:
            reason = f"memory stalls {psi:.1f}% of the last 10 s (PSI), over {self.psi_limit:g}%"
        need = self.min_available - avail if low else self.min_available // 4
        quiet = self._in_episode  # one line per episode, then only when something was freed
        self._in_episode = True
        event = self.governor.shrink(need, reason, log=self.log, quiet=quiet)
        reading["freed_bytes"] = event["freed_bytes"]
        return reading

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-pressure")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001  (a failed reading must not end the watch)
                self.log(f"memory pressure check failed: {e}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
