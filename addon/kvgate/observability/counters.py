"""Counters behind ``kvcache.stats``: routing reasons, helper calls, actions."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()
        # counts only the event loop's thread makes (every routed request makes two):
        # one writer, so no lock (a lock is two thirds of an increment's cost)
        self._loop: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def inc_on_loop(self, name: str) -> None:
        """``inc`` for a count made on the event loop's thread only (the request path)."""
        self._loop[name] += 1

    def get(self, name: str) -> int:
        return self._c.get(name, 0) + self._loop.get(name, 0)

    def grouped(self) -> dict[str, dict[str, int]]:
        """``routes.cache`` -> {"routes": {"cache": n}}."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            merged = self._c.copy()
        merged.update(dict(self._loop))  # Counter.update adds; dict(): one C-level copy
        items = sorted(merged.items())
        for key, value in items:
            group, _, name = key.partition(".")
            out.setdefault(group, {})[name or group] = value
        return out
