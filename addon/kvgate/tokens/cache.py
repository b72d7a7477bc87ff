"""Token ids of prompts seen before: an LRU with a TTL, keyed by the prompt's hash."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cachetools import TTLCache

Tokens = tuple[int, ...]


class TokenCache:
    """LRU with a TTL (the seed evicted at random); counts hits and misses like the seed."""

    def __init__(self, enabled: bool, capacity: int, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self._cache: TTLCache[str, Tokens] = TTLCache(
            maxsize=max(capacity, 1), ttl=ttl if ttl > 0 else math.inf, timer=clock
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Tokens | None:
        if not self.enabled:
            return None
        with self._lock:
            tokens = self._cache.get(key)
            if tokens is None:
                self.misses += 1
            else:
                self.hits += 1
            return tokens

    def peek(self, key: str) -> Tokens | None:
        """A probe that does not count as a hit or miss (conversation prefixes)."""
        if not self.enabled:
            return None
        with self._lock:
            return self._cache.get(key)

    def put(self, key: str, tokens: Sequence[int]) -> None:
        if self.enabled and tokens:
            with self._lock:
                self._cache[key] = tuple(tokens)

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)

    def snapshot(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "enabled": self.enabled,
            "size": len(self),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / total, 4) if total else 0.0,
        }
