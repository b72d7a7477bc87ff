"""How often each (model, prompt) was seen inside the hot window: the pinning signal."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

MIN_SWEEP_INTERVAL = 30.0


def sweep_interval(window: float) -> float:
    """The seed's rule: half the window, but at least 30 s once the window exceeds 30 s."""
    if window <= 0:
        return 0.0
    interval = window / 2
    if window > MIN_SWEEP_INTERVAL and interval < MIN_SWEEP_INTERVAL:
        interval = MIN_SWEEP_INTERVAL
    return interval


class HotTracker:
    """Per key a bounded deque of sighting times; keys kept in least-recently-seen order."""

    def __init__(self, window: float, max_records: int, max_keys: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.max_records = max(1, max_records)
        self.max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()
        self._interval = sweep_interval(window)
        self._last_sweep = clock()
        self.sweeps = 0

    def _trim(self, times: deque[float], now: float) -> None:
        cutoff = now - self.window
        while times and times[0] < cutoff:
            times.popleft()

    def _sweep(self, now: float) -> None:
        for key in list(self._keys):
            times = self._keys[key]
            self._trim(times, now)
            if not times:
                del self._keys[key]
        self._last_sweep = now
        self.sweeps += 1

    def record(self, key: str) -> None:
        if self.window <= 0:
            return
        now = self._clock()
        with self._lock:
            if self._interval and now - self._last_sweep >= self._interval:
                self._sweep(now)
            times = self._keys.get(key)
            if times is None:
                times = self._keys[key] = deque(maxlen=self.max_records)
            else:
                self._keys.move_to_end(key)
            times.append(now)
            self._trim(times, now)
            if self.max_keys and len(self._keys) > self.max_keys:
                # Keys are in least-recently-seen order: the oldest is either expired
                # (the seed drops those first) or the least recently seen (dropped next),
                # so popping from the front does both without a full sweep.
                while len(self._keys) > self.max_keys:
                    self._keys.popitem(last=False)

    def count(self, key: str) -> int:
        now = self._clock()
        with self._lock:
            times = self._keys.get(key)
            if not times:
                return 0
            self._trim(times, now)
            if not times:
                del self._keys[key]
                return 0
            return len(times)

    def is_hot(self, key: str, threshold: int) -> bool:
        return threshold > 0 and self.count(key) >= threshold

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)
