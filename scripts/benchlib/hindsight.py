"""Placement with hindsight: how far a router that knew the whole stream in advance could
take the hit ratio and the TTFT p99 together, for each number of copies it makes.

Why: on hot_prefix the hit-ratio target asks for at most one miss more than a router that
never copies a prompt (vllm-router's cache_aware), and the p99 target for a tail well
under a router that copies every prompt everywhere (power_of_two). Whether both can hold
at once on a run's stream is a question about the stream, not about kvgate; this answers
it for placements that commit each request to one engine on arrival, as every router here
does.

The model is the simulator's (``kvgate.sim.engine``): engines of a few batch slots, first
come first served on each; a request holds a slot for its prefill then its decode steps;
cached tokens cost nothing. Prompts are grouped by their first chunk (256 tokens): a hot
system prompt, a document, one chat. Every group that recurs gets a fixed set of holder
engines; each of its requests goes to the holder whose slot frees first. A group seen once
goes to whichever engine frees first. A request's cached tokens are the longest prefix it
shares (in whole 16-token blocks) with an earlier request of its group on the same engine:
nothing is evicted, which favours the hindsight placement. Each holder past a group's first
is a copy (its first request there prefills the group's prefix again).

The search is local (a balanced start, then moves of a group to another engine, then copies
added one at a time, keeping the best few), not exhaustive: its frontier is what hindsight
reached, not a proven bound. Faults (an engine lost) are not modelled.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .floor import common_prefix
from .stats import pct

CHUNK = 256  # LMCache's chunk: what groups a prompt
BLOCK = 16  # the simulated engines cache whole blocks


@dataclass(frozen=True)
class Engine:
    slots: int
    prefill_ms: float  # wall-clock ms per uncached token (the model's times its time scale)
    hold_ms: float  # wall-clock ms a request keeps its slot after the first token


@dataclass(frozen=True)
class Request:
    start: float  # seconds into the run
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Point:
    copies: int
    hit_ratio: float
    p50_ms: float
    p99_ms: float
    holders: tuple[tuple[int, ...], ...]
    """Per recurring group, most requested first: the engines holding it."""


class Stream:
    """One run's requests in sending order, grouped, with each request's best match among
    the earlier requests of its group (precomputed once for every placement tried)."""

    def __init__(self, requests: Sequence[Request], engines: Sequence[Engine]) -> None:
        self.requests = sorted(requests, key=lambda r: r.start)
        self.engines = list(engines)
        by_key: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(self.requests):
            by_key.setdefault(r.tokens[:CHUNK], []).append(i)
        groups = sorted((ix for ix in by_key.values() if len(ix) > 1), key=len, reverse=True)
        self.sizes = [len(ix) for ix in groups]
        self.group = [-1] * len(self.requests)  # -1: seen once, goes anywhere
        for g, ix in enumerate(groups):
            for i in ix:
                self.group[i] = g
        # per request: (shared tokens, earlier request) of its group, most shared first
        self.matches: list[list[tuple[int, int]]] = [[] for _ in self.requests]
        for ix in groups:
            for a, i in enumerate(ix):
                ti = self.requests[i].tokens
                shared = ((common_prefix(ti, self.requests[j].tokens) // BLOCK * BLOCK, j)
                          for j in ix[:a])
                self.matches[i] = sorted((m for m in shared if m[0] > 0), reverse=True)
        self.total_tokens = sum(len(r.tokens) for r in self.requests)

    def play(self, holders: Sequence[Sequence[int]],
             routes: Sequence[int] | None = None,
             gap_ms: float | None = None) -> tuple[float, float, float]:
        """(hit ratio, p50 ms, p99 ms) of the stream with each group on its holders, or
        with each request on the engine ``routes`` names (a router's own choices replayed:
        how close the model comes to the run), or by the online rule ``gap_ms`` sets: to
        the holder of its group whose slot frees first, unless some engine's frees more
        than ``gap_ms`` sooner (then there: a copy); a new group to the engine that frees
        first. The rule knows every engine's queue exactly, which no router does."""
        free = [[0.0] * e.slots for e in self.engines]
        where = [0] * len(self.requests)
        cached_sum = 0
        ttfts = []
        everyone = range(len(self.engines))
        held: dict[int, set[int]] = {}  # the online rule's holders, as it made them
        for i, r in enumerate(self.requests):
            g = self.group[i]
            if routes is not None:
                e = routes[i]
            elif gap_ms is not None:
                e = min(everyone, key=lambda k: (free[k][0], k))
                mine = held.setdefault(g, set()) if g >= 0 else None
                if mine:
                    h = min(mine, key=lambda k: (free[k][0], k))
                    if (max(r.start, free[h][0]) - max(r.start, free[e][0])) * 1000 <= gap_ms:
                        e = h
                if mine is not None:
                    mine.add(e)
            else:
                choice = holders[g] if g >= 0 else everyone
                e = min(choice, key=lambda k: (max(r.start, free[k][0]), k))
            where[i] = e
            cached = next((n for n, j in self.matches[i] if where[j] == e), 0)
            cached_sum += cached
            eng = self.engines[e]
            begin = max(r.start, heapq.heappop(free[e]))
            prefill = (len(r.tokens) - cached) * eng.prefill_ms
            ttfts.append((begin - r.start) * 1000 + prefill)
            heapq.heappush(free[e], begin + (prefill + eng.hold_ms) / 1000)
        ttfts.sort()
        return cached_sum / max(self.total_tokens, 1), pct(ttfts, 50), pct(ttfts, 99)


def _key(result: tuple[float, float, float]) -> tuple[float, float]:
    hit, _, p99 = result
    return (round(p99, 3), -hit)


def _balanced(stream: Stream) -> list[list[int]]:
    """Most requested group first, each to the engine with the fewest requests per slot."""
    load = [0.0] * len(stream.engines)
    out = []
    for size in stream.sizes:
        e = min(range(len(load)), key=lambda k: (load[k], k))
        load[e] += size / stream.engines[e].slots
        out.append([e])
    return out


def _primaries(stream: Stream, limit: int) -> list[list[list[int]]]:
    """Every one-holder placement when there are at most ``limit`` (the first group on the
    first engine when the engines are alike), else the balanced one improved by moves."""
    n_eng, n_grp = len(stream.engines), len(stream.sizes)
    alike = len(set(stream.engines)) == 1
    free = n_grp - 1 if alike else n_grp
    if n_grp and n_eng ** free <= limit:
        return [([[0]] if alike else []) + [[e] for e in combo]
                for combo in itertools.product(range(n_eng), repeat=free)]
    return [_moves(stream, _balanced(stream))[1]]


def _moves(stream: Stream, holders: list[list[int]],
           rounds: int = 4) -> tuple[tuple[float, float], list[list[int]]]:
    """Move one holder of a group to an engine not holding it while that lowers (p99,
    -hit); the placement reached and its key."""
    best = _key(stream.play(holders))
    for _ in range(rounds):
        improved = False
        for g in range(len(holders)):
            for h in list(holders[g]):
                for e in range(len(stream.engines)):
                    if e in holders[g] or h not in holders[g]:
                        continue
                    trial = [list(x) for x in holders]
                    trial[g] = sorted([x for x in trial[g] if x != h] + [e])
                    k = _key(stream.play(trial))
                    if k < best:
                        best, holders, improved = k, trial, True
        if not improved:
            break
    return best, holders


def frontier(stream: Stream, max_copies: int = 6, beam: int = 12,
             limit: int = 1024) -> list[Point]:
    """The best (p99, then hit ratio) placement found for 0..max_copies copies.

    Copies are added one at a time to the best ``beam`` placements of the layer before,
    each then improved by moves. The first copy is tried on every one-holder placement
    (``_primaries``): without copies the hottest group's queue decides p99, which says
    nothing about where the others should be."""
    layer = _primaries(stream, limit)
    out = [_point(stream, min(layer, key=lambda h: _key(stream.play(h))), 0)]
    for k in range(1, max_copies + 1):
        seen: set[tuple[tuple[int, ...], ...]] = set()
        tried = []
        for holders in layer:
            for g in range(len(holders)):
                for e in range(len(stream.engines)):
                    if e in holders[g]:
                        continue
                    trial = [sorted(h) for h in holders]
                    trial[g] = sorted(trial[g] + [e])
                    sig = tuple(tuple(h) for h in trial)
                    if sig in seen:
                        continue
                    seen.add(sig)
                    tried.append((_key(stream.play(trial)), trial))
        if not tried:
            break
        tried.sort(key=lambda t: t[0])
        moved = [_moves(stream, t[1], rounds=2) for t in tried[:beam]]
        layer = [holders for _, holders in moved]
        out.append(_point(stream, min(moved, key=lambda m: m[0])[1], k))
    return out


def online(stream: Stream, gaps_ms: Sequence[float]) -> list[tuple[float, float, float]]:
    """(gap ms, hit ratio, p99 ms) of the online rule (``Stream.play``) for each gap: the
    curve a router that copies when a holder's queue exceeds the shortest by a set time
    walks along, with a perfect view of the queues."""
    out = []
    for gap in gaps_ms:
        hit, _, p99 = stream.play([], gap_ms=gap)
        out.append((gap, round(hit, 4), round(p99, 1)))
    return out


def _point(stream: Stream, holders: Sequence[Sequence[int]], copies: int) -> Point:
    hit, p50, p99 = stream.play(holders)
    return Point(copies, round(hit, 4), round(p50, 1), round(p99, 1),
                 tuple(tuple(sorted(h)) for h in holders))
