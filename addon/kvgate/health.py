"""Which endpoints may take traffic. Passive for now: a connect failure ejects an endpoint
for a cool-down, after which it is tried again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

EJECT_SECONDS = 5.0


class HealthBook:
    def __init__(self, eject_seconds: float = EJECT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.eject_seconds = eject_seconds
        self._clock = clock
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.ejections = 0

    def is_healthy(self, endpoint_id: str) -> bool:
        until = self._down_until.get(endpoint_id)
        return until is None or self._clock() >= until

    def mark_down(self, endpoint_id: str) -> None:
        with self._lock:
            self._down_until[endpoint_id] = self._clock() + self.eject_seconds
            self.ejections += 1

    def mark_up(self, endpoint_id: str) -> None:
        with self._lock:
            self._down_until.pop(endpoint_id, None)

    def snapshot(self) -> dict[str, bool]:
        return {ep: self.is_healthy(ep) for ep in self._down_until}
