"""How often each (model, prompt) was seen inside the hot window: the pinning signal."""

from __future__ import annotations

import threading
import time
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable

MIN_SWEEP_INTERVAL = 30.0
# sighting times held in all (8 bytes each): 16 MiB
MAX_SIGHTINGS = 2_000_000


def sweep_interval(window: float) -> float:
    """The seed's rule: half the window, but at least 30 s once the window exceeds 30 s."""
    if window <= 0:
        return 0.0
    interval = window / 2
    if window > MIN_SWEEP_INTERVAL and interval < MIN_SWEEP_INTERVAL:
        interval = MIN_SWEEP_INTERVAL
    return interval


class HotTracker:
    """Per key its sighting times; keys kept in least-recently-seen order.

    Compact, because it holds up to ``max_keys`` (100 000) prompts: a key is kept as its
    Python hash (a prompt key's 64-character text would cost ~110 bytes; a collision at
    100 000 keys in 2**64 is ~3e-10), one sighting as a float, more as ``array('d')``.
    About 170 bytes a key instead of ~1.1 KB with a deque each. Sightings held in all are
    bounded too (``max_sightings``, 8 bytes each), least recently seen keys going first.
    """

    def __init__(self, window: float, max_records: int, max_keys: int,
                 clock: Callable[[], float] = time.monotonic,
                 max_sightings: int = MAX_SIGHTINGS) -> None:
        self.window = window
        self.max_records = max(1, max_records)
        self.max_keys = max_keys
        self.max_sightings = max(1, max_sightings)
        self._clock = clock
        self._keys: OrderedDict[int, float | array[float]] = OrderedDict()
        self._sightings = 0  # times held in arrays (a lone float is not counted)
        self._lock = threading.Lock()
        self._interval = sweep_interval(window)
        self._last_sweep = clock()
        self.sweeps = 0

    @staticmethod
    def _last(times: float | array[float]) -> float:
        return times if isinstance(times, float) else times[-1]

    def _trim(self, k: int, times: float | array[float], now: float) -> int:
        """Drop sightings older than the window; the count left (0: the key is gone)."""
        cutoff = now - self.window
        if isinstance(times, float):
            if times < cutoff:
                del self._keys[k]
                return 0
            return 1
        drop = bisect_left(times, cutoff)
        if drop:
            del times[:drop]
            self._sightings -= drop
        if not times:
            del self._keys[k]
        return len(times)

    def _drop_oldest(self) -> None:
        _, times = self._keys.popitem(last=False)
        if not isinstance(times, float):
            self._sightings -= len(times)

    def _sweep(self, now: float) -> None:
        """Keys whose last sighting left the window. They are in least-recently-seen
        order, so this stops at the first live one: no walk over 100 000 keys."""
        cutoff = now - self.window
        while self._keys and self._last(next(iter(self._keys.values()))) < cutoff:
            self._drop_oldest()
        self._last_sweep = now
        self.sweeps += 1

    def record(self, key: str) -> None:
        if self.window <= 0:
            return
        now = self._clock()
        k = hash(key)
        with self._lock:
            if self._interval and now - self._last_sweep >= self._interval:
                self._sweep(now)
            times = self._keys.get(k)
            if times is None:
                self._keys[k] = now
            else:
                self._keys.move_to_end(k)
                if isinstance(times, float):
                    times = self._keys[k] = array("d", (times,))
                    self._sightings += 1
                times.append(now)
                self._sightings += 1
                if len(times) > self.max_records:
                    del times[0]
                    self._sightings -= 1
                self._trim(k, times, now)
            if self.max_keys and len(self._keys) > self.max_keys:
                # Keys are in least-recently-seen order: the oldest is either expired
                # (the seed drops those first) or the least recently seen (dropped next),
                # so popping from the front does both without a full sweep.
                while len(self._keys) > self.max_keys:
                    self._drop_oldest()
            while self._sightings > self.max_sightings and len(self._keys) > 1:
                self._drop_oldest()

    def count(self, key: str) -> int:
        now = self._clock()
        k = hash(key)
        with self._lock:
            times = self._keys.get(k)
            if times is None:
                return 0
            return self._trim(k, times, now)

    def is_hot(self, key: str, threshold: int) -> bool:
        return threshold > 0 and self.count(key) >= threshold

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)
