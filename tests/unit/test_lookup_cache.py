"""The lookup-answer cache (placement.lookup_cache.LookupCache).

A prompt seen again within lookup_cache_ttl reuses its lookup answer, with the gateway's
own routing of it overlaid; the first expiry stands, so staleness stays bounded. For
lookup_stale_ttl more the stale answer routes while one lookup renews it in the background,
and requests for a prompt whose lookup is in flight share that lookup.

First the object alone, with a scripted lookup (no network); then through the gateway
against the stub controller."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import pytest

from kvgate.clients.http import CallError
from kvgate.observability.counters import Counters
from kvgate.placement.layout import Placement
from kvgate.placement.lookup_cache import LookupCache
from kvgate.policies import base as routing

from unit_support import calls


class Scripted:
    """A /lookup stand-in: records each call, answers after ``delay``, or fails."""

    def __init__(self, answer: list[Placement], delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.fail = False
        self.calls: list[list[int]] = []

    async def __call__(self, probe: Sequence[int], timeout: float) -> list[Placement]:
        self.calls.append(list(probe))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise CallError("lmcache /lookup: status 500", status=500, retryable=True)
        return list(self.answer)


HELD = [Placement("e2", "LocalCPUBackend", 512)]


def _cache(ask: Scripted, ttl: float = 10.0, stale: float = 1.0,
           renewals: int = 8) -> tuple[LookupCache, Counters]:
    counters = Counters()
    return LookupCache(ask, ttl, stale, renewals, counters), counters


def _age(cache: LookupCache, key: str, expired_ago: float) -> None:
    _, placements = cache.entries[key]
    cache.entries[key] = (time.monotonic() - expired_ago, placements)


def test_an_answer_is_reused_within_the_ttl_without_asking() -> None:
    ask = Scripted(HELD)
    cache, _ = _cache(ask)

    async def go() -> tuple:
        first = await cache.find("k", [1, 2], True, 1.0, 1.0)
        cache.overlay("k", first[0], "e2", 2)  # what the gateway does once it routed
        return first, await cache.find("k", [1, 2], True, 1.0, 1.0)

    first, second = asyncio.run(go())
    assert first == (HELD, "routing_ok")
    assert second == (HELD, "reused")
    assert ask.calls == [[1, 2]]


def test_an_earlier_turns_answer_is_never_reused_for_this_prompt() -> None:
    ask = Scripted(HELD)
    cache, _ = _cache(ask)
    cache.overlay("k", HELD, "e2", 2)
    placements, how = asyncio.run(cache.find("k", [1, 2], False, 1.0, 1.0))
    assert how == "routing_ok" and len(ask.calls) == 1


def test_a_stale_answer_routes_and_one_renewal_makes_it_fresh() -> None:
    ask = Scripted([Placement("e3", "L", 700)], delay=0.05)
    cache, counters = _cache(ask, stale=5.0)
    cache.overlay("k", HELD, "e2", 2)
    _age(cache, "k", 1.0)

    async def go() -> tuple:
        stale = await cache.find("k", [1], True, 1.0, 1.0)
        again = await cache.find("k", [1], True, 1.0, 1.0)  # the renewal is under way
        await asyncio.gather(*cache.in_flight(asyncio.get_running_loop()))
        return stale, again

    stale, again = asyncio.run(go())
    assert stale[1] == again[1] == "stale"
    assert [p.instance_id for p in stale[0]] == ["e2"]
    assert len(ask.calls) == 1  # one renewal for both
    assert counters.get("lookup.renewed") == 1
    assert cache.recent("k") == ([Placement("e3", "L", 700)], False)


def test_past_the_stale_window_the_answer_is_gone() -> None:
    cache, _ = _cache(Scripted(HELD), stale=1.0)
    cache.overlay("k", HELD, "e2", 2)
    _age(cache, "k", 1.5)
    assert cache.recent("k") is None
    assert "k" not in cache.entries


def test_renewals_in_flight_are_capped() -> None:
    ask = Scripted(HELD, delay=0.05)
    cache, counters = _cache(ask, renewals=1)

    async def go() -> None:
        cache.revalidate("a", [1], 1.0)
        cache.revalidate("b", [2], 1.0)  # over the cap: it will expire instead
        await asyncio.gather(*cache.in_flight(asyncio.get_running_loop()))

    asyncio.run(go())
    assert ask.calls == [[1]]
    assert counters.get("lookup.renew_skipped") == 1


def test_concurrent_askers_share_one_lookup_and_its_failure() -> None:
    ask = Scripted(HELD, delay=0.05)
    cache, counters = _cache(ask)

    async def together() -> list:
        return await asyncio.gather(*(cache.ask("k", [1], 1.0) for _ in range(3)),
                                    return_exceptions=True)

    assert asyncio.run(together()) == [HELD] * 3
    assert len(ask.calls) == 1 and counters.get("lookup.joined") == 2
    ask.fail = True
    failed = asyncio.run(together())
    assert all(isinstance(r, CallError) for r in failed)
    assert len(ask.calls) == 2 and cache.asking == {}


def test_a_joiner_out_of_budget_fails_alone() -> None:
    ask = Scripted(HELD, delay=0.2)
    cache, _ = _cache(ask)

    async def go() -> tuple:
        first = asyncio.ensure_future(cache.ask("k", [1], 1.0))
        await asyncio.sleep(0)
        with pytest.raises(CallError, match="timed out"):
            await cache.ask("k", [1], 0.05)
        return await first

    assert asyncio.run(go()) == HELD
    assert len(ask.calls) == 1


def test_overlay_adds_the_endpoint_served_and_keeps_the_first_expiry() -> None:
    cache, _ = _cache(Scripted([]))
    cache.overlay("k", [Placement("e1", "L", 256)], "e2", 300)
    expiry = cache.entries["k"][0]
    got = {p.instance_id: p.tokens for p in cache.recent("k")[0]}
    assert got == {"e1": 256, "e2": 300}
    cache.overlay("k", [Placement("e1", "L", 256)], "e3", 300)
    assert cache.entries["k"][0] == expiry  # reuse never extends staleness


def test_ttl_zero_keeps_nothing_and_shares_nothing() -> None:
    ask = Scripted(HELD, delay=0.02)
    cache, counters = _cache(ask, ttl=0.0)
    cache.overlay("k", HELD, "e2", 2)
    assert cache.recent("k") is None and len(cache.entries) == 0

    async def together() -> list:
        return await asyncio.gather(*(cache.ask("k", [1], 1.0) for _ in range(2)))

    asyncio.run(together())
    assert len(ask.calls) == 2 and counters.get("lookup.joined") == 0


# ------------------------------------------------------------ through the gateway


def _body(ids: list[int]) -> bytes:
    return json.dumps({"model": "m", "prompt": ids}).encode()


def test_a_repeat_within_the_ttl_needs_no_lookup(make_gateway, controller) -> None:
    ids = list(range(1, 301))
    controller.holdings = {"vllm-2": [ids]}
    gw = make_gateway({"lookup_cache_ttl": "10s"})
    first = gw.route("vllm", _body(ids))
    second = gw.route("vllm", _body(ids))
    assert len(calls(controller, "/lookup")) == 1
    assert gw.counters.get("lookup.reused") == 1
    assert second.decision.reason == routing.CACHE
    assert second.decision.endpoint.id == first.decision.endpoint.id == "vllm-2"
    assert second.placements is not None
    assert {p.instance_id: p.tokens for p in second.placements} == {"vllm-2": 300}


def test_where_the_gateway_sent_a_new_prompt_counts_as_cached(make_gateway, controller) -> None:
    ids = list(range(1000, 1300))
    gw = make_gateway({"lookup_cache_ttl": "10s"})
    first = gw.route("vllm", _body(ids))
    assert first.decision.reason == routing.BALANCER  # nobody holds it yet
    second = gw.route("vllm", _body(ids))
    assert len(calls(controller, "/lookup")) == 1
    # the engine that served it will hold it: the repeat follows, before LMCache knows
    assert second.decision.reason == routing.CACHE
    assert second.decision.endpoint.id == first.decision.endpoint.id


def test_the_answer_expires_at_its_first_expiry_even_when_reused(make_gateway,
                                                                 controller) -> None:
    ids = list(range(2000, 2300))
    gw = make_gateway({"lookup_cache_ttl": "300ms", "lookup_stale_ttl": 0})
    gw.route("vllm", _body(ids))
    t_end = time.monotonic() + 0.5
    while time.monotonic() < t_end:  # reused over and over: it must still expire
        gw.route("vllm", _body(ids))
        time.sleep(0.02)
    assert len(calls(controller, "/lookup")) >= 2


def test_ttl_zero_asks_every_time_and_failures_are_not_remembered(make_gateway,
                                                                  controller) -> None:
    ids = list(range(3000, 3010))
    gw = make_gateway({"lookup_cache_ttl": 0})
    gw.route("vllm", _body(ids))
    gw.route("vllm", _body(ids))
    assert len(calls(controller, "/lookup")) == 2
    gw = make_gateway({"lookup_cache_ttl": "10s"})
    controller.script["/lookup"] = [500]
    assert gw.route("vllm", _body(ids)).decision.reason == routing.FALLBACK
    gw.route("vllm", _body(ids))
    assert len(calls(controller, "/lookup")) == 4  # the failure was not reused


def test_overlay_keeps_the_longer_known_hold() -> None:
    from kvgate.config import from_mapping
    from kvgate.gateway import Gateway

    from unit_support import gateway_doc

    gw = Gateway(from_mapping(gateway_doc("http://127.0.0.1:1", "http://127.0.0.1:2",
                                             {"lookup_cache_ttl": "10s"})))
    try:
        gw.lookups.overlay("k", [Placement("a", "LocalCPUBackend", 900), Placement("b", "X", 10)],
                    "a", 500)
        recent = gw.lookups.recent("k")
        assert recent is not None and recent[1] is False  # fresh
        got = {p.instance_id: (p.location, p.tokens) for p in recent[0]}
        assert got == {"a": ("LocalCPUBackend", 900), "b": ("X", 10)}
    finally:
        gw.close()


def _expire(gw, key: str, ago: float) -> None:
    """Make the stored answer for ``key`` have expired ``ago`` seconds back."""
    expiry, placements = gw.lookups.entries[key]
    gw.lookups.entries[key] = (time.monotonic() - ago, placements)


def _known(gw, ids: list[int]) -> bytes:
    """A body whose tokens the gateway already has: routing it needs lookups only."""
    body = _body(ids)
    gw.token_cache.put(gw.prepare("vllm", body).key, ids)
    return body


def _at_once(gw, body: bytes, n: int) -> list:
    """``n`` concurrent routings of ``body`` on one event loop."""

    async def together() -> list:
        try:
            return await asyncio.gather(*(gw.route_async("vllm", body) for _ in range(n)))
        finally:
            gw.helpers.aio_lmcache.close_loop()

    return asyncio.run(together())


def test_a_stale_answer_routes_at_once_and_is_renewed_in_the_background(
        make_gateway, controller) -> None:
    ids = list(range(4000, 4300))
    controller.holdings = {"vllm-3": [ids]}
    gw = make_gateway({"lookup_cache_ttl": "10s", "lookup_stale_ttl": "10s",
                       "lookup_routing_timeout": "2s"})
    first = gw.route("vllm", _body(ids))
    assert first.decision.endpoint.id == "vllm-3"
    _expire(gw, first.key, 1.0)
    controller.delay = 0.4  # the renewal is slow: the request must not wait for it

    async def stale_then_renewed() -> tuple[float, object]:
        t0 = time.monotonic()
        routed = await gw.route_async("vllm", _body(ids))
        took = time.monotonic() - t0
        await asyncio.gather(*list(gw.lookups.asking.values()))  # the renewal, in the background
        gw.helpers.aio_lmcache.close_loop()
        return took, routed

    took, routed = asyncio.run(stale_then_renewed())
    assert took < 0.2
    assert routed.decision.reason == routing.CACHE
    assert routed.decision.endpoint.id == "vllm-3"
    assert gw.counters.get("lookup.stale") == 1
    assert gw.counters.get("lookup.renewed") == 1
    assert len(calls(controller, "/lookup")) == 2
    fresh = gw.lookups.recent(first.key)
    assert fresh is not None and fresh[1] is False  # renewed: fresh for another TTL
    controller.delay = 0.0
    gw.route("vllm", _body(ids))
    assert len(calls(controller, "/lookup")) == 2
    assert gw.counters.get("lookup.reused") == 1


def test_past_the_stale_window_the_request_waits_for_a_fresh_answer(make_gateway,
                                                                     controller) -> None:
    ids = list(range(5000, 5300))
    gw = make_gateway({"lookup_cache_ttl": "10s", "lookup_stale_ttl": "1s"})
    first = gw.route("vllm", _body(ids))
    _expire(gw, first.key, 1.5)  # expired 1.5 s ago: beyond the 1 s stale window
    gw.route("vllm", _body(ids))
    assert gw.counters.get("lookup.stale") == 0
    assert gw.counters.get("lookup.routing_ok") == 2
    assert len(calls(controller, "/lookup")) == 2


def test_a_failed_renewal_keeps_the_stale_answer_only_to_the_end_of_its_window(
        make_gateway, controller) -> None:
    ids = list(range(6000, 6300))
    controller.holdings = {"vllm-2": [ids]}
    gw = make_gateway({"lookup_cache_ttl": "10s", "lookup_stale_ttl": "1s"})
    first = gw.route("vllm", _body(ids))
    _expire(gw, first.key, 0.5)
    controller.script["/lookup"] = [500]
    routed = gw.route("vllm", _body(ids))
    assert routed.decision.endpoint.id == "vllm-2"  # the stale answer still routed it
    assert gw.counters.get("lookup.renew_failed") == 1
    recent = gw.lookups.recent(first.key)
    assert recent is not None and recent[1] is True  # still stale, not renewed
    _expire(gw, first.key, 1.5)
    assert gw.lookups.recent(first.key) is None


def test_requests_for_a_prompt_being_looked_up_share_that_lookup(make_gateway,
                                                                 controller) -> None:
    ids = list(range(7000, 7300))
    controller.holdings = {"vllm-2": [ids]}
    controller.delay = 0.2
    gw = make_gateway({"lookup_cache_ttl": "10s", "lookup_routing_timeout": "2s"})
    routed = _at_once(gw, _known(gw, ids), 3)
    assert len(calls(controller, "/lookup")) == 1
    assert gw.counters.get("lookup.joined") == 2
    assert [r.decision.endpoint.id for r in routed] == ["vllm-2"] * 3
    assert all(r.decision.reason == routing.CACHE for r in routed)


def test_with_ttl_zero_every_request_asks_even_at_the_same_time(make_gateway,
                                                                controller) -> None:
    ids = list(range(8000, 8300))
    controller.delay = 0.1
    gw = make_gateway({"lookup_cache_ttl": 0, "lookup_routing_timeout": "2s"})
    _at_once(gw, _known(gw, ids), 2)
    assert len(calls(controller, "/lookup")) == 2
    assert gw.counters.get("lookup.joined") == 0


def test_a_shared_lookup_that_outlasts_a_budget_fails_that_request_only(make_gateway,
                                                                        controller) -> None:
    ids = list(range(9000, 9300))
    controller.holdings = {"vllm-3": [ids]}
    controller.delay = 0.3
    gw = make_gateway({"lookup_cache_ttl": "10s", "lookup_routing_timeout": "100ms"})
    routed = gw.route("vllm", _known(gw, ids))
    assert routed.decision.reason == routing.FALLBACK
    assert "timed out" in routed.decision.detail
    assert gw.lookups.asking == {}


def test_a_failed_shared_lookup_fails_every_request_that_joined_it(make_gateway,
                                                                   controller) -> None:
    ids = list(range(9500, 9800))
    controller.delay = 0.2
    controller.script["/lookup"] = [500]
    gw = make_gateway({"lookup_cache_ttl": "10s", "lookup_routing_timeout": "2s"})
    routed = _at_once(gw, _known(gw, ids), 3)
    assert len(calls(controller, "/lookup")) == 1
    assert gw.counters.get("lookup.joined") == 2
    assert [r.decision.reason for r in routed] == [routing.FALLBACK] * 3
    assert gw.lookups.asking == {}
