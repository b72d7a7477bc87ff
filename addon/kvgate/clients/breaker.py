"""Circuit breaker with the seed's three knobs, so a dead helper costs nothing per request.

pybreaker was considered: it has no ``half_open_max_calls`` (it lets one trial call
through), and the seed's semantics need several, so this is the seed's small state
machine, made thread-safe and with a failure in half-open reopening at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum


class BreakerOpen(Exception):
    """Raised instead of calling a helper whose breaker is open."""


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failure_threshold: int,
        recovery_timeout: float,
        half_open_max_calls: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = max(1, failure_threshold)
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = max(1, half_open_max_calls)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._half_open_calls = 0
        self.times_opened = 0
        self.rejected = 0

    @property
    def state(self) -> State:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _maybe_half_open(self) -> None:
        if (
            self._state is State.OPEN
            and self._clock() - self._opened_at >= self.recovery_timeout
        ):
            self._state = State.HALF_OPEN
            self._half_open_calls = 0

    def allow(self) -> bool:
        """Take a slot for one call; False means fail fast."""
        with self._lock:
            self._maybe_half_open()
            if self._state is State.OPEN:
                self.rejected += 1
                return False
            if self._state is State.HALF_OPEN:
                if self._half_open_calls >= self.half_open_max_calls:
                    self.rejected += 1
                    return False
                self._half_open_calls += 1
            return True

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._state = State.CLOSED
            self._half_open_calls = 0

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is State.HALF_OPEN or self._failures >= self.failure_threshold:
                if self._state is not State.OPEN:
                    self.times_opened += 1
                self._state = State.OPEN
                self._opened_at = self._clock()

    def release(self) -> None:
        """Give back a half-open slot for a call that proved nothing (e.g. cancelled)."""
        with self._lock:
            if self._state is State.HALF_OPEN and self._half_open_calls > 0:
                self._half_open_calls -= 1

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "consecutive_failures": self._failures,
            "times_opened": self.times_opened,
            "rejected": self.rejected,
        }
