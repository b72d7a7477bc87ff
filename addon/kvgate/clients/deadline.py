"""A deadline plus a cancel flag: how background work is bounded and cancelled with its client."""

from __future__ import annotations

import threading
import time


class Cancelled(Exception):
    """The deadline passed or the client went away."""


class Deadline:
    def __init__(self, timeout: float, cancel: threading.Event | None = None) -> None:
        self.expires_at = time.monotonic() + timeout
        self.cancel = cancel or threading.Event()

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    @property
    def done(self) -> bool:
        return self.cancel.is_set() or self.remaining() <= 0

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("client went away")
        if self.remaining() <= 0:
            raise Cancelled("deadline exceeded")

    def sleep(self, seconds: float) -> bool:
        """Sleep unless cancelled; False when the sleep would outlast the deadline."""
        if seconds >= self.remaining():
            return False
        return not self.cancel.wait(seconds)
