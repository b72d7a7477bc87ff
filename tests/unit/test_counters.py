"""Counters: the event loop's lock-free counts and the locked ones read as one."""

from __future__ import annotations

from kvgate.observability.counters import Counters


def test_counts_made_on_the_loop_and_elsewhere_add_up() -> None:
    c = Counters()
    c.inc("routes.cache", 2)  # a background thread's count
    for _ in range(3):
        c.inc_on_loop("routes.cache")
    c.inc_on_loop("lookup.reused")
    assert c.get("routes.cache") == 5
    assert c.get("lookup.reused") == 1
    assert c.get("routes.fallback") == 0
    assert c.grouped() == {"routes": {"cache": 5}, "lookup": {"reused": 1}}
