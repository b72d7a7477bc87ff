"""TokenCache: LRU with a TTL (the seed evicted at random), counted like the seed."""

from __future__ import annotations

from kvgate.tokens.cache import TokenCache

from unit_support import FakeClock


def test_ttl_expiry(clock: FakeClock) -> None:
    cache = TokenCache(True, capacity=10, ttl=60, clock=clock)
    cache.put("k", [1, 2])
    clock.advance(59.5)
    assert cache.get("k") == (1, 2)
    clock.advance(1)
    assert cache.get("k") is None
    assert len(cache) == 0
    assert (cache.hits, cache.misses) == (1, 1)


def test_lru_eviction_keeps_recently_used(clock: FakeClock) -> None:
    cache = TokenCache(True, capacity=2, ttl=60, clock=clock)
    cache.put("a", [1])
    cache.put("b", [2])
    assert cache.get("a") == (1,)  # a becomes the most recently used
    cache.put("c", [3])  # over capacity: b, the least recently used, goes
    assert cache.get("b") is None
    assert cache.get("a") == (1,)
    assert cache.get("c") == (3,)
    assert len(cache) == 2


def test_zero_ttl_means_no_expiry(clock: FakeClock) -> None:
    cache = TokenCache(True, capacity=2, ttl=0, clock=clock)
    cache.put("k", [5])
    clock.advance(10**9)
    assert cache.get("k") == (5,)


def test_disabled_cache_stores_and_counts_nothing(clock: FakeClock) -> None:
    cache = TokenCache(False, capacity=2, ttl=60, clock=clock)
    cache.put("k", [1])
    assert cache.get("k") is None
    assert len(cache) == 0
    assert cache.snapshot() == {"enabled": False, "size": 0, "hits": 0, "misses": 0,
                                "hit_rate": 0.0}


def test_empty_token_list_is_not_cached(clock: FakeClock) -> None:
    cache = TokenCache(True, capacity=2, ttl=60, clock=clock)
    cache.put("k", [])
    assert len(cache) == 0


def test_stats_like_the_seed(clock: FakeClock) -> None:
    cache = TokenCache(True, capacity=10, ttl=60, clock=clock)
    assert cache.get("k") is None
    cache.put("k", [11, 22])
    assert cache.get("k") == (11, 22)
    assert cache.get("k") == (11, 22)
    snap = cache.snapshot()
    assert (snap["size"], snap["hits"], snap["misses"]) == (1, 2, 1)
    assert snap["hit_rate"] == round(2 / 3, 4)


def test_stored_tokens_are_immutable_copies(clock: FakeClock) -> None:
    cache = TokenCache(True, capacity=2, ttl=60, clock=clock)
    source = [1, 2, 3]
    cache.put("k", source)
    source.append(4)
    assert cache.get("k") == (1, 2, 3)
