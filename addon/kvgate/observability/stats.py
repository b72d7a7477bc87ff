"""What the gateway reports, read from its parts when asked: the ``kvcache.stats`` command's
JSON and the Prometheus exporter's figures come from the same place."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

from ..cache_management.pool import BoundedPool
from ..clients.breaker import CircuitBreaker
from ..fleet.cluster import Cluster
from ..fleet.health import HealthBook
from ..tokens.cache import TokenCache
from .counters import Counters


@dataclass
class Sources:
    enabled: bool
    counters: Counters
    breakers: Mapping[str, CircuitBreaker]
    unsupported_actions: Callable[[], dict[str, int]]
    background: BoundedPool
    token_cache: TokenCache
    hot_keys: Sized
    clusters: Mapping[str, Cluster]
    health: HealthBook
    discovery: Callable[[], dict[str, Any] | None]

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "token_cache": self.token_cache.snapshot(),
            "hot_keys": len(self.hot_keys),
            "counters": self.counters.grouped(),
            "breakers": {name: br.snapshot() for name, br in self.breakers.items()},
            "unsupported_actions": self.unsupported_actions(),
            "background": self.background.snapshot(),
            "inflight": {n: dict(c.inflight) for n, c in self.clusters.items()},
            "ejected": [ep for ep, ok in self.health.snapshot().items() if not ok],
            "discovery": self.discovery(),
        }
