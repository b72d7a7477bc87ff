"""Counters behind ``kvcache.stats``: routing reasons, helper calls, actions."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def get(self, name: str) -> int:
        return self._c.get(name, 0)

    def grouped(self) -> dict[str, dict[str, int]]:
        """``routes.cache`` -> {"routes": {"cache": n}}."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            items = sorted(self._c.items())
        for key, value in items:
            group, _, name = key.partition(".")
            out.setdefault(group, {})[name or group] = value
        return out
