"""Which endpoints may take traffic.

Active: the engine monitor (``engine_metrics``) asks every endpoint ``GET /health`` and
ejects it until a check passes. Passive (``outliers``): connect failures and answers that
keep failing eject it for a while; a passing health check does not end that early, since
an engine can answer /health and still fail every request.
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
        self._down_until: dict[str, float] = {}  # active checks
        self._ejected_until: dict[str, float] = {}  # passive (outlier detection)
        self._lock = threading.Lock()
        self.ejections = 0
        self.on_down: Callable[[str], None] | None = None
        """Told when an endpoint leaves rotation: it may come back empty."""

    def is_healthy(self, endpoint_id: str) -> bool:
        until = self._down_until.get(endpoint_id)
        ejected = self._ejected_until.get(endpoint_id)
        if until is None and ejected is None:  # the common case: one test per lookup
            return True
        now = self._clock()
        return (until is None or now >= until) and (ejected is None or now >= ejected)

    def checks_down(self, endpoint_id: str) -> bool:
        """Out by the active checks (or a connect failure), whatever passive ejection says."""
        until = self._down_until.get(endpoint_id)
        return until is not None and self._clock() < until

    def mark_down(self, endpoint_id: str, until_up: bool = False) -> bool:
        """Eject for the cool-down, or (active checks) until ``mark_up``; True when it
        was in rotation until now (an event worth one log line)."""
        with self._lock:
            was_up = self.is_healthy(endpoint_id)
            span = float("inf") if until_up else self.eject_seconds
            self._down_until[endpoint_id] = self._clock() + span
            if was_up:
                self.ejections += 1
        if was_up and self.on_down is not None:
            self.on_down(endpoint_id)
        return was_up

    def eject(self, endpoint_id: str, seconds: float) -> bool:
        """Passive ejection for ``seconds``; health checks passing do not end it."""
        with self._lock:
            was_up = self.is_healthy(endpoint_id)
            self._ejected_until[endpoint_id] = self._clock() + seconds
            if was_up:
                self.ejections += 1
        if was_up and self.on_down is not None:
            self.on_down(endpoint_id)
        return was_up

    def mark_up(self, endpoint_id: str) -> None:
        with self._lock:
            self._down_until.pop(endpoint_id, None)

    def snapshot(self) -> dict[str, bool]:
        return {ep: self.is_healthy(ep) for ep in {*self._down_until, *self._ejected_until}}
