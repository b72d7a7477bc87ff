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

A chunk sent to a second engine is remembered longer, with every engine it went to
(``SHARED_WINDOW``): lmcache 0.5.6's ``/lookup`` names only the first registered instance
holding a chunk, so past the window a copy made elsewhere (a hot system prompt spread over
two engines) would be invisible, and routing would keep charging for a copy that exists.
Those claims count only as deep as LMCache still names somebody for the prefix: content
evicted everywhere is not brought back by the gateway's memory.
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
SHARED_WINDOW = 60.0  # seconds a chunk sent to several engines counts for all of them
SHARED_CAPACITY = 10_000  # such chunks remembered (a few hundred bytes each)


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
        # chunk -> {endpoint: when sent}, for chunks sent to more than one engine; in the
        # order they were last sent
        self._shared: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, tokens: Sequence[int], endpoint_id: str) -> None:
        """``tokens`` were just sent to ``endpoint_id``: it will hold their whole chunks."""
        if self.window <= 0:
            return
        chain = _chain(tokens)
        now = self._clock()
        oldest = now - self.window
        shared_oldest = now - SHARED_WINDOW
        with self._lock:
            shared = self._shared
            for _, h in chain:
                holders = shared.pop(h, None)
                last = self._map.get(h)
                if (holders is None and last is not None and last[0] != endpoint_id
                        and last[1] >= shared_oldest):  # a second engine: now shared
                    holders = {last[0]: last[1]}
                if holders is not None:
                    holders[endpoint_id] = now
                    shared[h] = holders  # at the end: the newest last
                self._map[h] = (endpoint_id, now)
                self._map.move_to_end(h)
            while shared and max(next(iter(shared.values())).values()) < shared_oldest:
                shared.popitem(last=False)
            while len(shared) > SHARED_CAPACITY:
                shared.popitem(last=False)
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

    def held(self, tokens: Sequence[int], confirmed: int = 0) -> dict[str, int]:
        """Per endpoint, the tokens of this prompt's prefix sent there within the window,
        and, up to ``confirmed`` tokens (what LMCache names somebody for), sent there
        within ``SHARED_WINDOW`` when other engines were sent it too.

        A chunk's key chains every chunk before it, so an endpoint sent a chunk holds the
        prefix up to its end; the walk goes on while chunks are known."""
        if self.window <= 0:
            return {}
        chain = _chain(tokens)
        now = self._clock()
        oldest, shared_oldest = now - self.window, now - SHARED_WINDOW
        out: dict[str, int] = {}
        with self._lock:
            for end, h in chain:
                entry = self._map.get(h)
                if entry is not None and entry[1] < oldest:
                    entry = None
                holders = self._shared.get(h) if end <= confirmed else None
                if entry is None and holders is None:
                    break
                if entry is not None:
                    out[entry[0]] = end
                for ep, when in (holders or {}).items():
                    if when >= shared_oldest:
                        out[ep] = end
        return out

    def forget(self, endpoint_id: str) -> None:
        """Nothing more is claimed for this endpoint (it left rotation, and may come back
        empty); rare, so a walk over the maps is fine."""
        with self._lock:
            for h in [h for h, (ep, _) in self._map.items() if ep == endpoint_id]:
                del self._map[h]
            for h in [h for h, holders in self._shared.items() if endpoint_id in holders]:
                holders = self._shared[h]
                del holders[endpoint_id]
                if not holders:
                    del self._shared[h]

    def __len__(self) -> int:
        return len(self._map)

    @property
    def shared(self) -> int:
        """Chunks remembered as sent to several engines."""
        return len(self._shared)


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
