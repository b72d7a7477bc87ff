"""Which endpoints may take traffic.

Passive: a connect failure ejects an endpoint for a cool-down. Active: the engine monitor
(``engine_metrics``) asks every endpoint ``GET /health`` and ejects it until a check passes.
"""

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

    def mark_down(self, endpoint_id: str, until_up: bool = False) -> None:
        """Eject for the cool-down, or (active checks) until ``mark_up``."""
        with self._lock:
            was_up = self.is_healthy(endpoint_id)
            span = float("inf") if until_up else self.eject_seconds
            self._down_until[endpoint_id] = self._clock() + span
            if was_up:
                self.ejections += 1

    def mark_up(self, endpoint_id: str) -> None:
        with self._lock:
            self._down_until.pop(endpoint_id, None)

    def snapshot(self) -> dict[str, bool]:
        return {ep: self.is_healthy(ep) for ep in self._down_until}
