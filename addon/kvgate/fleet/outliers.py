"""Outlier detection on answers, as Envoy does it: an engine that keeps failing the
requests it is sent is taken out of rotation for a while, longer each time.

A failure is a 5xx answer, a connection that ends before the answer does (a reset, a
killed engine) or no response headers within ``response_headers_timeout``. ``failures``
of them in a row eject the engine for ``base`` x the times it was ejected, at most
``longest``; the count of ejections is forgotten once ``longest`` passes without one.
A connect failure ejects at once (nothing answers there) until a health check sees the
engine accept connections again. Every ejection is one event: the caller logs it once,
not once per failed request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..config import OutlierConfig
from .health import HealthBook


class OutlierDetector:
    def __init__(self, cfg: OutlierConfig, book: HealthBook,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_needed = cfg.consecutive_failures
        self.base = cfg.base_ejection_time
        self.longest = cfg.max_ejection_time
        self.book = book
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._ejections: dict[str, tuple[int, float]] = {}  # id -> (times, last at)

    def success(self, endpoint_id: str) -> None:
        if self._failures.get(endpoint_id):
            with self._lock:
                self._failures[endpoint_id] = 0

    def failure(self, endpoint_id: str) -> float | None:
        """Count one failed answer; the ejection time when this one ejects the engine."""
        if self.failures_needed <= 0:
            return None
        with self._lock:
            n = self._failures.get(endpoint_id, 0) + 1
            self._failures[endpoint_id] = n
            if n < self.failures_needed or not self.book.is_healthy(endpoint_id):
                return None
            self._failures[endpoint_id] = 0
            return self._eject(endpoint_id)

    def connect_failed(self, endpoint_id: str) -> float | None:
        """Nothing accepted the connection: out now, until an active health check sees it
        accept again or ``eject_seconds`` pass (an engine restarted is back at once, not
        after a back-off meant for engines that answer badly). None if it was out."""
        with self._lock:
            if not self.book.is_healthy(endpoint_id):
                return None
            self.book.mark_down(endpoint_id)
            return self.book.eject_seconds

    def _eject(self, endpoint_id: str) -> float:
        now = self._clock()
        times, last = self._ejections.get(endpoint_id, (0, now))
        if now - last > self.longest:
            times = 0
        times += 1
        self._ejections[endpoint_id] = (times, now)
        span = min(self.base * times, self.longest) if self.base > 0 else 5.0
        self.book.eject(endpoint_id, span)
        return span
