"""A bounded pool for cache-management work: fixed threads, a fixed queue, drops counted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger("kvgate")


class BoundedPool:
    def __init__(self, name: str, workers: int, queue: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(workers + queue)
        self.capacity = workers + queue
        self._lock = threading.Lock()
        self.pending = 0
        self.submitted = 0
        self.dropped = 0
        self.failed = 0

    def submit(self, fn: Callable[[], object]) -> bool:
        """Run fn later; False (and counted) when the pool and its queue are full."""
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self.dropped += 1
            return False
        with self._lock:
            self.pending += 1
            self.submitted += 1
        try:
            future = self._pool.submit(fn)
        except RuntimeError:  # shut down
            self._done(None)
            return False
        future.add_done_callback(self._done)
        return True

    def _done(self, future: Future | None) -> None:
        if future is not None and not future.cancelled() and future.exception() is not None:
            with self._lock:
                self.failed += 1
            log.warning("[kvcache] background task failed: %r", future.exception())
        with self._lock:
            self.pending -= 1
        self._slots.release()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "capacity": self.capacity,
            "submitted": self.submitted,
            "dropped": self.dropped,
            "failed": self.failed,
        }
