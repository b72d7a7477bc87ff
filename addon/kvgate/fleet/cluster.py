"""A cluster at run time: its endpoints, the round-robin balancer and in-flight counts."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..config import ClusterConfig
from .endpoint import Endpoint


class Cluster:
    def __init__(self, cfg: ClusterConfig, is_healthy: Callable[[str], bool]) -> None:
        self.name = cfg.name
        # replaced, never mutated (discovery): readers iterate whatever list they got
        self.endpoints: tuple[Endpoint, ...] = cfg.endpoints
        self.by_id = {ep.id: ep for ep in cfg.endpoints}
        self.is_up = is_healthy
        """``healthy`` for an id known to be the cluster's (no membership test)."""
        self._lock = threading.Lock()
        self._next = 0
        self.inflight: dict[str, int] = {ep.id: 0 for ep in cfg.endpoints}
        self.finished: dict[str, int] = {}  # requests ended per endpoint, ever

    def healthy(self, endpoint_id: str) -> bool:
        return endpoint_id in self.by_id and self.is_up(endpoint_id)

    def round_robin(self) -> Endpoint:
        """The next healthy endpoint in rotation; when none is healthy, the next one at all."""
        with self._lock:
            n = len(self.endpoints)
            for step in range(n):
                ep = self.endpoints[(self._next + step) % n]
                if self.is_up(ep.id):
                    self._next = (self._next + step + 1) % n
                    return ep
            ep = self.endpoints[self._next % n]
            self._next = (self._next + 1) % n
            return ep

    def begin(self, endpoint_id: str) -> None:
        with self._lock:
            self.inflight[endpoint_id] = self.inflight.get(endpoint_id, 0) + 1

    def end(self, endpoint_id: str) -> None:
        with self._lock:
            if self.inflight.get(endpoint_id, 0) > 0:
                self.inflight[endpoint_id] -= 1
            self.finished[endpoint_id] = self.finished.get(endpoint_id, 0) + 1

    def add(self, ep: Endpoint) -> None:
        """Join (or re-address) an endpoint learnt at run time."""
        with self._lock:
            self.endpoints = tuple(e for e in self.endpoints if e.id != ep.id) + (ep,)
            self.by_id = {e.id: e for e in self.endpoints}
            self.inflight.setdefault(ep.id, 0)

    def remove(self, endpoint_id: str) -> None:
        with self._lock:
            kept = tuple(e for e in self.endpoints if e.id != endpoint_id)
            if kept:  # a cluster never ends up empty
                self.endpoints = kept
                self.by_id = {e.id: e for e in kept}
