"""Where the gateway has just sent each prompt prefix, in LMCache's 256-token chunks.

An engine tells LMCache what it stored only after it has prefilled the prompt, and
LMCache's workers report to the controller in batches (every 10 ms in lmcache 0.5.6), so
for a while after a request was sent, ``/lookup`` does not know that its engine will hold
its prefix. A request right behind it that shares the prefix (the next turn of a chat,
another question on the same document, the same system prompt) would then route as if
nothing were cached, and the prefix would be computed twice on two engines. This memory
closes that gap: for ``window`` seconds after a request was sent, its chunks count as held
by its engine. Past the window, LMCache's own answer is the truth (engines evict).

Chunks are chained hashes of the packed token ids, like LMCache's own keys; at most
``MAX_CHUNKS`` per prompt are kept; chunks past the window are dropped as new ones come,
and the map is bounded in entries too.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..tokens.cache import PackedTokens
from .layout import Placement

CHUNK = 256
MAX_CHUNKS = 128  # 32k tokens: deeper prefixes wait for LMCache's answer
CAPACITY = 100_000  # chunks remembered (about 100 bytes each)


def _chain(tokens: Sequence[int]) -> list[tuple[int, int]]:
    """(tokens up to the chunk's end, chained hash) per whole chunk, from the prompt's
    start."""
    try:
        data = (tokens if isinstance(tokens, PackedTokens) else PackedTokens.pack(tokens)).data
    except (OverflowError, TypeError, ValueError):  # ids that are no 32-bit tokens
        return []
    step = CHUNK * 4
    out = []
    h = 0
    for i in range(min(len(data) // step, MAX_CHUNKS)):
        h = hash((h, data[i * step:(i + 1) * step]))
        out.append(((i + 1) * CHUNK, h))
    return out


class RecentRoutes:
    def __init__(self, window: float, capacity: int = CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.capacity = capacity
        self._clock = clock
        self._map: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, tokens: Sequence[int], endpoint_id: str) -> None:
        """``tokens`` were just sent to ``endpoint_id``: it will hold their whole chunks."""
        if self.window <= 0:
            return
        chain = _chain(tokens)
        now = self._clock()
        oldest = now - self.window
        with self._lock:
            for _, h in chain:
                self._map[h] = (endpoint_id, now)
                self._map.move_to_end(h)
            # the map is in the order chunks were noted: what is past the window is at the
            # front, and no use to anyone (distinct prompts would otherwise fill it to
            # ``capacity``, ~20 MB, and keep it there)
            m = self._map
            while m:
                first = next(iter(m))
                if m[first][1] >= oldest:
                    break
                del m[first]
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)

    def held(self, tokens: Sequence[int]) -> dict[str, int]:
        """Per endpoint, the tokens of this prompt's prefix sent there within the window.

        Each chunk remembers the endpoint it went to last; that endpoint holds every chunk
        before it too (it prefilled them), so the walk goes on while chunks are known."""
        if self.window <= 0:
            return {}
        chain = _chain(tokens)
        oldest = self._clock() - self.window
        out: dict[str, int] = {}
        with self._lock:
            for end, h in chain:
                entry = self._map.get(h)
                if entry is None or entry[1] < oldest:
                    break
                out[entry[0]] = end
        return out

    def __len__(self) -> int:
        return len(self._map)


def merge(placements: Sequence[Placement], held: dict[str, int]) -> list[Placement]:
    """LMCache's answer, raised where the gateway has just sent more of the prompt."""
    if not held:
        return list(placements)
    out = []
    for p in placements:
        more = held.pop(p.instance_id, 0)
        out.append(Placement(p.instance_id, p.location, more) if more > p.tokens else p)
    out += [Placement(ep, "", tokens) for ep, tokens in held.items()]
    return out
