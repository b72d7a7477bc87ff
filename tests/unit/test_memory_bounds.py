"""Issue 11, defects 2 and 3: every cache of the gateway bounded in bytes, measured with
tracemalloc (what Python allocated and still holds)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

from kvgate.cache_management.hotness import HotTracker
from kvgate.cache_management.pool import BoundedPool
from kvgate.placement.layout import Placement
from kvgate.placement.lookup_cache import LookupCache
from kvgate.placement.prefix_index import PrefixIndex
from kvgate.request.parsing import cache_key
from kvgate.tokens.cache import PackedTokens, TokenCache

from unit_support import FakeClock


def _held(build: Callable[[], Any]) -> tuple[Any, int]:
    """(what build returned, bytes it still holds)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        obj = build()
        return obj, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_token_cache_is_bounded_by_total_tokens_at_4_bytes_each() -> None:
    """Before: 40 prompts of 200k tokens were 8M tuple ints, ~290 MB; no token bound."""
    def build() -> TokenCache:
        cache = TokenCache(True, capacity=10_000, ttl=0, max_tokens=1_000_000)
        for i in range(40):
            cache.put(f"k{i}", range(i, i + 200_000))
        return cache

    cache, held = _held(build)
    assert cache.tokens <= 1_000_000 and len(cache) == 5  # the 5 most recent fit
    assert held < 1_000_000 * 4 + 64 * 1024  # 4 bytes a token, little else
    assert cache.get("k39") == tuple(range(39, 200_039))
    assert cache.get("k0") is None


def test_a_prompt_larger_than_the_budget_is_not_cached() -> None:
    cache = TokenCache(True, capacity=10, ttl=0, max_tokens=1000)
    cache.put("small", [1] * 600)
    assert cache.put("huge", [1] * 1001) is None
    assert cache.get("small") is not None and cache.get("huge") is None
    assert cache.too_large == 1


def test_ids_that_do_not_fit_32_bits_are_not_cached() -> None:
    cache = TokenCache(True, capacity=10, ttl=0)
    assert cache.put("k", [1, 2**40]) is None and cache.get("k") is None


def test_packed_tokens_behave_as_a_sequence() -> None:
    packed = PackedTokens.pack([5, 6, 7, 8])
    assert len(packed) == 4 and packed[1] == 6 and list(packed) == [5, 6, 7, 8]
    assert packed == (5, 6, 7, 8) and packed == [5, 6, 7, 8] and packed != (5, 6)
    assert packed[1:3] == (6, 7) and packed.tolist() == [5, 6, 7, 8]
    assert packed.nbytes == 16


def test_hot_tracker_at_100k_keys_stays_small(clock: FakeClock) -> None:
    """Before: ~1.1 KB a key (a deque each): ~110 MB at the 100 000-key default."""
    keys = [cache_key("m", f"prompt {i}") for i in range(100_000)]

    def build() -> HotTracker:
        hot = HotTracker(window=300, max_records=300, max_keys=100_000, clock=clock)
        for k in keys:
            hot.record(k)
            clock.advance(0.001)
        return hot

    hot, held = _held(build)
    assert len(hot) == 100_000
    assert held < 25 * 1024 * 1024, held  # ~170 bytes a key measured here
    assert hot.count(keys[-1]) == 1


def test_hot_tracker_bounds_its_sightings(clock: FakeClock) -> None:
    hot = HotTracker(window=300, max_records=300, max_keys=0, clock=clock, max_sightings=1000)
    for i in range(20):
        for _ in range(100):
            hot.record(f"k{i}")
            clock.advance(0.001)
    assert hot._sightings <= 1000
    assert hot.count("k19") == 100  # the most recently seen stay whole


def test_prefix_index_at_capacity() -> None:
    def build() -> PrefixIndex:
        index = PrefixIndex(100_000)
        for i in range(20_000):  # 8 pieces each: 160 000 recorded, 100 000 kept
            index.record(f"{i:08d}" * 256, "vllm-1")
        return index

    index, held = _held(build)
    assert len(index) == 100_000
    assert held < 20 * 1024 * 1024, held


def test_lookup_cache_weighs_answers_by_their_placements() -> None:
    async def ask(probe: Any, timeout: float) -> list[Placement]:
        return []

    from kvgate.observability.counters import Counters

    cache = LookupCache(ask, 60, 60, 8, Counters(), size=100)
    many = [Placement(f"i{n}", "L", n) for n in range(64)]
    for i in range(100):
        cache.overlay(f"k{i}", many, "i0", 10)
    assert len(cache.entries) <= 100 // 9 + 1  # an answer of 64 weighs 9
    for i in range(200):
        cache.overlay(f"small{i}", [Placement("a", "L", 1)], "a", 10)
    assert len(cache.entries) == 100  # a fleet's few placements weigh 1


def test_background_pool_bounds_the_bytes_its_tasks_hold() -> None:
    import threading

    gate = threading.Event()
    pool = BoundedPool("t", 1, 100, max_bytes=20 * 1024 * 1024)
    try:
        taken = [pool.submit(gate.wait, 8 * 1024 * 1024) for _ in range(5)]
        assert taken == [True, True, False, False, False]  # 3 x 8 MiB > 20 MiB
        assert pool.dropped == 3
    finally:
        gate.set()
        pool.shutdown()
