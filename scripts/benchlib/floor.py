"""The time to first token no router can beat, request by request.

A router only chooses where a request goes; it cannot make an engine prefill faster. So
each request has a floor: the prefill of what no earlier request could have left in any
cache, on an idle engine. Here "earlier" is every request *sent* before it (whether or
not its prefill had finished: generous), "could have left" is the longest prefix it
shares with one of them in tokens (the simulator caches whole blocks of prompts, never
answers: less), and cached tokens cost nothing (a CPU-tier load costs a tenth of a
prefill: less again). Each floor is at or below what any router gets for that request, so
a percentile of the floors is at or below that router's same percentile, and the
requests whose floor is over the TTFT objective cap everybody's goodput.

When 0.8 x the best peer's p99 is under the floor's p99, no router meets that target on
that stream: the tail is cold prefill, not routing.

The floor has no queue in it. The *pooled ideal* adds one (``pooled_ms``): every batch slot
of the cluster in one first-come-first-served queue, each request served at its floor's
prefill then its decode steps. A router has to commit each request to one engine when it
arrives, where the pool lets it take whichever slot frees first, so the pool is what
routing would reach with perfect balance and a cache holding everything everywhere. It is
a reference, not a proven bound (another order of service could have a lower p99), so a
target past it is reported as such, not as out of reach.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from .stats import pct

Tokens = tuple[int, ...]


def common_prefix(a: Tokens, b: Tokens) -> int:
    """Length of the longest common prefix (binary search on slices: C speed for the
    32k-token documents of long_context)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def new_tokens(prompts: Sequence[Tokens]) -> list[int]:
    """For each prompt, in sending order: its tokens past the longest prefix it shares with
    any prompt before it.

    In a sorted list, the member sharing the longest prefix with a sequence is next to
    where the sequence would go, so two comparisons a prompt suffice.
    """
    seen: list[Tokens] = []
    out = []
    for p in prompts:
        i = bisect_left(seen, p)
        shared = 0
        if i > 0:
            shared = common_prefix(p, seen[i - 1])
        if i < len(seen):
            shared = max(shared, common_prefix(p, seen[i]))
        out.append(len(p) - shared)
        seen.insert(i, p)
    return out


def floors_ms(records: Sequence[Any], tokenize: Callable[[dict], list[int]],
              prefill_ms: float, time_scale: float) -> list[float]:
    """Each record's floor in wall-clock ms, in the records' order. Records carry the
    ``body`` they sent and their ``start`` (send time)."""
    order = sorted(range(len(records)), key=lambda i: records[i].start)
    prompts = [tuple(tokenize(records[i].body or {})) for i in order]
    floors = [0.0] * len(records)
    for i, n in zip(order, new_tokens(prompts), strict=True):
        floors[i] = n * prefill_ms * time_scale
    return floors


def pooled_ms(records: Sequence[Any], floors: Sequence[float], slots: int,
              hold_ms: float) -> list[float]:
    """Each record's TTFT in the pooled ideal, in wall-clock ms, in the records' order:
    requests in sending order take the first of ``slots`` to free, and hold it for their
    floor's prefill plus ``hold_ms`` (the decode steps after the first token)."""
    free = [0.0] * max(slots, 1)  # when each slot frees, seconds into the run
    out = [0.0] * len(records)
    for i in sorted(range(len(records)), key=lambda i: records[i].start):
        sent = records[i].start
        begin = max(sent, heapq.heappop(free))
        out[i] = (begin - sent) * 1000 + floors[i]
        heapq.heappush(free, begin + (floors[i] + hold_ms) / 1000)
    return out


def figures(records: Sequence[Any], window: float, slo_ms: float,
            tokenize: Callable[[dict], list[int]],
            engines: Sequence[tuple[float, float]],
            pool: tuple[int, float] | None = None) -> dict[str, Any]:
    """A run's floor: p50/p99 of the floors of the requests that succeeded (as the run's
    own percentiles), and the goodput no router could beat (requests whose floor meets
    the objective, over the same window). ``engines``: (prefill_ms, time_scale) per engine,
    the fastest counts. With ``pool`` (the cluster's batch slots, the wall-clock ms a
    request holds one after its first token) the pooled ideal's figures too."""
    prefill_ms, scale = min(engines, key=lambda e: e[0] * e[1])
    floors = floors_ms(records, tokenize, prefill_ms, scale)
    out = _percentiles("floor_ttft_ms", "goodput_ceiling_rps", floors, records, window,
                       slo_ms)
    if pool is not None:
        out.update(_percentiles("pooled_ttft_ms", "pooled_goodput_rps",
                                pooled_ms(records, floors, *pool), records, window, slo_ms))
    return out


def _percentiles(name: str, goodput: str, ttft: Sequence[float], records: Sequence[Any],
                 window: float, slo_ms: float) -> dict[str, Any]:
    ok = sorted(f for f, r in zip(ttft, records, strict=True) if r.ok)
    within = sum(1 for f in ttft if f <= slo_ms)
    return {name: {"p50": round(pct(ok, 50), 1), "p99": round(pct(ok, 99), 1)},
            goodput: round(within / window, 2) if window > 0 else 0.0}
