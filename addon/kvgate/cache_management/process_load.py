"""The seed's load monitor: request rate plus the gateway process's CPU and memory ratios.

These are the seed's signals ("load" = the gateway's own CPU); kvgate keeps them for
parity. Engine-side signals come with the routing work (issue 4).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadMetrics:
    cpu: float = 0.0
    memory: float = 0.0
    request_rate: float = 0.0


def _memory_ratio() -> float:
    """Resident set size over physical memory (the closest analogue of Go's Alloc/Sys)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            rss_pages = int(fh.read().split()[1])
        total = os.sysconf("SC_PHYS_PAGES")
        return min(1.0, rss_pages / total) if total > 0 else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


class LoadMonitor:
    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._count = 0
        self._rate = 0.0
        self._last = time.monotonic()
        self._cpu_at: float | None = None
        self._cpu_seconds = 0.0
        self._ncpu = os.cpu_count() or 1

    def record_request(self) -> None:
        with self._lock:
            self._count += 1

    def _cpu(self, now: float) -> float:
        cpu = time.process_time()
        if self._cpu_at is None:
            self._cpu_at, self._cpu_seconds = now, cpu
            return 0.0
        wall = now - self._cpu_at
        delta = cpu - self._cpu_seconds
        self._cpu_at, self._cpu_seconds = now, cpu
        if wall <= 0 or delta <= 0:
            return 0.0
        return min(1.0, delta / (wall * self._ncpu))

    def snapshot(self) -> LoadMetrics:
        with self._lock:
            now = time.monotonic()
            cpu = self._cpu(now)
            elapsed = now - self._last
            if elapsed >= self.window:
                self._rate = self._count / elapsed
                self._count = 0
                self._last = now
            return LoadMetrics(cpu=cpu, memory=_memory_ratio(), request_rate=self._rate)
