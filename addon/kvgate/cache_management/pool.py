"""A bounded pool for cache-management work: fixed threads, a fixed queue, drops counted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger("kvgate")


MAX_BYTES = 32 * 1024 * 1024


class BoundedPool:
    """Bounded in tasks and in the bytes they hold (bodies kept for /tokenize): 256 queued
    8 MiB prompts would otherwise hold 2 GiB."""

    def __init__(self, name: str, workers: int, queue: int, max_bytes: int = MAX_BYTES) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(workers + queue)
        self.capacity = workers + queue
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lock = threading.Lock()
        self.pending = 0
        self.submitted = 0
        self.dropped = 0
        self.failed = 0

    def submit(self, fn: Callable[[], object], nbytes: int = 0) -> bool:
        """Run fn later; False (and counted) when the pool and its queue are full, or the
        bytes its tasks hold would pass ``max_bytes``."""
        with self._lock:
            if self.bytes + nbytes > self.max_bytes:
                self.dropped += 1
                return False
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self.dropped += 1
            return False
        with self._lock:
            self.pending += 1
            self.submitted += 1
            self.bytes += nbytes
        try:
            future = self._pool.submit(fn)
        except RuntimeError:  # shut down
            self._done(None, nbytes)
            return False
        future.add_done_callback(lambda f: self._done(f, nbytes))
        return True

    def _done(self, future: Future | None, nbytes: int = 0) -> None:
        if future is not None and not future.cancelled() and future.exception() is not None:
            with self._lock:
                self.failed += 1
            log.warning("[kvcache] background task failed: %r", future.exception())
        with self._lock:
            self.pending -= 1
            self.bytes -= nbytes
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
