"""A bounded local memory of which endpoint served which prompt prefix.

Used when LMCache cannot be asked (down, slow, breaker open, no tokens): like the peers'
approximate radix trees, it remembers where each prefix went, so a conversation keeps
going to the engine that holds its history instead of falling to round robin. Prefixes
are chains of 256-character pieces of the prompt text, hashed; LRU-bounded.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from cachetools import LRUCache

PIECE = 256
RECORDED_FOR = 10.0  # seconds a prompt, once recorded, is not hashed again
MAX_BYTES = 64 * 1024  # hashed per request on the event loop: a prefix this long is
# conversation identity enough, and an 8 MiB prompt must not cost milliseconds here


def _chain(text: str) -> list[tuple[int, int]]:
    """(end, hash of the text up to it) per whole piece: chained with Python's own hash,
    keyed per process like the recent routes' chunks (a blake2b chain cost ~25 000
    instructions a 1.6 KB prompt); a 64-bit int is 36 bytes, and this map holds 100 000."""
    data = text[:MAX_BYTES].encode("utf-8", "surrogatepass")[:MAX_BYTES]
    out = []
    h = 0
    for start in range(0, len(data) - PIECE + 1, PIECE):  # whole pieces only
        h = hash((h, data[start:start + PIECE]))
        out.append((start + PIECE, h))
    return out


class PrefixIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()
        # prompt key -> endpoint recorded: a repeat within 10 s skips the hashing, wherever
        # it went (a prompt served by two engines in turn is held by both: either is a
        # good answer, and re-recording it on each turn cost every request its hashing)
        # (key -> when it may be recorded again: an LRU read is half a TTLCache's, whose
        # expiry bookkeeping is Python calls on every read)
        self._recorded: LRUCache[str, float] = LRUCache(10_000)
        self._recorded_lock = threading.Lock()

    def note(self, key: str, text: str, endpoint_id: str) -> bool:
        """``record``, unless this prompt (by key) was recorded in the last 10 s; whether
        it was."""
        now = time.monotonic()
        with self._recorded_lock:
            try:  # one lookup: get() is a membership test and a lookup
                if self._recorded[key] > now:
                    return False
            except KeyError:
                pass
            self._recorded[key] = now + RECORDED_FOR
        self.record(text, endpoint_id)
        return True

    def record(self, text: str, endpoint_id: str) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            for _, key in _chain(text):
                self._map[key] = endpoint_id
                self._map.move_to_end(key)
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)

    def best(self, text: str) -> tuple[str, int] | None:
        """(endpoint id, bytes of prompt it is known to hold), deepest known prefix."""
        found: tuple[str, int] | None = None
        with self._lock:
            for end, key in _chain(text):
                ep = self._map.get(key)
                if ep is None:
                    break
                found = (ep, end)
        return found

    def __len__(self) -> int:
        return len(self._map)
