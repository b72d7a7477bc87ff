"""LMCache's answers to /lookup, reused: the one place routing asks where a prefix lives.

- **Reuse**: a prompt seen again within ``ttl`` routes on the answer it got, with where the
  gateway sent it since overlaid (that engine will hold it, before LMCache knows).
  A reused answer keeps its first expiry, so staleness stays bounded.
- **Stale while revalidate**: for ``stale_ttl`` after that, the old answer still routes at
  once while one background lookup renews it; a failed renewal leaves it to expire.
- **Shared lookups**: requests for a prompt whose lookup is in flight wait for that one
  answer instead of asking again. A joiner whose budget runs out fails alone; a failed
  lookup fails every joiner with an error, never a cancel.
- ``ttl`` 0 asks for every request (the seed's behaviour), sharing nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial

from cachetools import LRUCache

from ..clients.http import CallError
from ..observability.counters import Counters
from .layout import Placement

Ask = Callable[[Sequence[int], float], Awaitable[list[Placement]]]
SIZE = 10_000  # prompts whose answer is kept


def _weight(entry: tuple[float, tuple[Placement, ...]]) -> int:
    return 1 + len(entry[1]) // 8


class LookupCache:
    def __init__(self, ask: Ask, ttl: float, stale_ttl: float, max_renewals: int,
                 counters: Counters, size: int = SIZE,
                 timer: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        self._ask = ask
        self._timer = timer  # times the lookups routing waits for (a histogram)
        self.ttl = ttl
        self.stale_ttl = stale_ttl
        self.max_renewals = max_renewals
        self.counters = counters
        # key -> (expiry, placements); an answer of up to 8 placements weighs 1, one of 64
        # weighs 9: ``size`` answers of a fleet's few, fewer of many (a controller listing
        # 64 instances for every prompt must not make this 64x bigger in bytes)
        self.entries: LRUCache[str, tuple[float, tuple[Placement, ...]]] = LRUCache(
            size, getsizeof=_weight)
        self._lock = threading.Lock()
        # key -> the /lookup in flight for that prompt (on the loop that started it)
        self.asking: dict[str, asyncio.Future[list[Placement]]] = {}

    def recent(self, key: str) -> tuple[list[Placement], bool] | None:
        """This prompt's answer and whether it is stale: within ttl it is fresh, for
        stale_ttl more it still routes while a renewal runs."""
        if self.ttl <= 0:
            return None
        with self._lock:
            try:  # one lookup: get() is a membership test and a lookup
                entry = self.entries[key]
            except KeyError:
                return None
            now = time.monotonic()
            if now < entry[0]:
                return list(entry[1]), False
            if now < entry[0] + self.stale_ttl:
                return list(entry[1]), True
            del self.entries[key]
            return None

    async def find(self, key: str, probe: Sequence[int], reusable: bool, timeout: float,
                   renew_timeout: float) -> tuple[list[Placement], str]:
        """The answer to route on, and how it was had: ``reused``, ``stale`` (a renewal
        started) or ``routing_ok`` (asked now). Only the prompt's own tokens are
        ``reusable``: an earlier turn's answer is not this prompt's."""
        found = self.reuse(key, probe, renew_timeout) if reusable else None
        if found is not None:
            return found
        with self._timer():
            return await self.ask(key, probe, timeout), "routing_ok"

    def reuse(self, key: str, probe: Sequence[int],
              renew_timeout: float) -> tuple[list[Placement], str] | None:
        """``find`` without a wait: a recent answer (renewed in the background if stale),
        else None. The request path calls it first: most requests need no coroutine."""
        recent = self.recent(key)
        if recent is None:
            return None
        placements, stale = recent
        if stale:
            self.revalidate(key, probe, renew_timeout)
            return placements, "stale"
        return placements, "reused"

    async def ask(self, key: str, probe: Sequence[int], timeout: float) -> list[Placement]:
        """Where LMCache holds this prompt, sharing a lookup already in flight for it."""
        if self.ttl <= 0:  # ask for every request, as configured
            return await self._ask(probe, timeout)
        loop = asyncio.get_running_loop()
        pending = self.asking.get(key)
        if pending is not None and pending.get_loop() is loop:
            self.counters.inc("lookup.joined")
            try:
                return await asyncio.wait_for(asyncio.shield(pending), timeout)
            except TimeoutError:  # this request's budget ran out; the lookup goes on
                raise CallError("lmcache /lookup: timed out", retryable=True) from None
        # the first asker awaits the call itself (no task, no extra loop turn) and hands
        # the answer to whoever joined meanwhile
        shared: asyncio.Future[list[Placement]] = loop.create_future()
        self.asking[key] = shared
        try:
            placements = await self._ask(probe, timeout)
        except BaseException as exc:  # joiners get an error they fall back on, never a cancel
            shared.set_exception(exc if isinstance(exc, Exception) else CallError(
                "lmcache /lookup: cancelled", retryable=True))
            shared.exception()  # retrieved: nothing to report when it is collected
            raise
        else:
            shared.set_result(placements)
            return placements
        finally:
            if self.asking.get(key) is shared:
                del self.asking[key]

    def revalidate(self, key: str, probe: Sequence[int], timeout: float) -> None:
        """Renew a stale answer in the background: the request routes on the stale one."""
        if key in self.asking:
            return  # already being renewed (or asked)
        if len(self.asking) >= self.max_renewals:
            self.counters.inc("lookup.renew_skipped")  # bounded: it expires instead
            return
        task = asyncio.get_running_loop().create_task(self._ask(probe, timeout))
        self.asking[key] = task  # requests that need an answer meanwhile join it
        task.add_done_callback(partial(self._renewed, key))

    def _renewed(self, key: str, task: asyncio.Future[list[Placement]]) -> None:
        if self.asking.get(key) is task:
            del self.asking[key]
        # exception() also marks a failure as seen: joiners re-raised it already
        if task.cancelled() or task.exception() is not None:
            self.counters.inc("lookup.renew_failed")
            return
        self.counters.inc("lookup.renewed")
        with self._lock:
            self.entries[key] = (time.monotonic() + self.ttl, tuple(task.result()))

    def overlay(self, key: str, placements: Sequence[Placement], endpoint_id: str,
                n_tokens: int) -> None:
        """Keep the answer, adding that ``endpoint_id`` will hold the whole prompt once it
        has served it. A reused answer keeps its first expiry: staleness stays bounded."""
        if self.ttl <= 0:
            return
        held = None
        for p in placements:  # (a loop: a generator is a call per request)
            if p.instance_id == endpoint_id:
                held = p
                break
        if held is not None and held.tokens >= n_tokens and key in self.entries:
            return  # already known: a reused answer routed the same way
        merged = [p for p in placements if p.instance_id != endpoint_id]
        merged.append(Placement(endpoint_id, held.location if held else "",
                                max(n_tokens, held.tokens if held else 0)))
        with self._lock:
            entry = self.entries.get(key)
            expiry = entry[0] if entry is not None else time.monotonic() + self.ttl
            self.entries[key] = (expiry, tuple(merged))

    def in_flight(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Future[list[Placement]]]:
        """Lookups started on ``loop``: a loop that ends waits for them first."""
        return [t for t in list(self.asking.values()) if t.get_loop() is loop]
