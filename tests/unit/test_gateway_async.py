"""Gateway.route_async (the addon's request path, on the event loop) against the stubs."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from kvgate.clients.breaker import State
from kvgate.config import from_mapping
from kvgate.gateway import PARSE_INLINE_MAX, Gateway
from kvgate.policies import base as routing
from kvgate.sim.stub import tokenize_text

from unit_support import calls, gateway_doc, paths

PROMPT = " ".join(f"word{i}" for i in range(300))
BODY = json.dumps({"model": "m", "prompt": PROMPT}).encode()


def _route(gw, body: bytes = BODY):
    """One request on a fresh loop; keep-alive connections are closed while it still runs,
    as the addon's hooks do on mitmproxy's loop."""

    async def run():
        try:
            return await gw.route_async("vllm", body)
        finally:
            gw.helpers.aio_tokenizer.close()
            gw.helpers.aio_lmcache.close()

    return asyncio.run(run())


def test_first_sight_routes_by_cache_within_budget(make_gateway, engine, controller) -> None:
    tokens = tokenize_text(PROMPT)
    controller.holdings = {"vllm-3": [tokens], "vllm-1": [tokens[:256] + [0] * 10]}
    gw = make_gateway({"lookup_cache_ttl": 0})  # every request asks LMCache
    start = time.monotonic()
    routed = _route(gw)
    assert time.monotonic() - start < gw.routing_budget
    assert routed.decision.reason == routing.CACHE
    assert (routed.decision.endpoint.id, routed.decision.matched_tokens) == ("vllm-3", 300)
    assert engine.raw_tokenize == [BODY]
    assert [c["tokens"] for c in calls(controller, "/lookup")] == [tokens]
    assert len(gw.token_cache) == 1

    again = _route(gw)  # token cache hit: lookup only
    assert again.decision.endpoint.id == "vllm-3"
    assert len(engine.raw_tokenize) == 1
    assert len(calls(controller, "/lookup")) == 2


def test_seed_rule_without_route_on_miss(make_gateway, engine, controller) -> None:
    gw = make_gateway({"route_on_miss": False})
    routed = _route(gw)
    assert routed.decision.reason == routing.BALANCER
    assert routed.decision.detail == "token cache miss"
    assert paths(engine) == [] and paths(controller) == []


def test_token_ids_skip_tokenize(make_gateway, engine, controller) -> None:
    controller.layout = {"vllm-2": 3}
    gw = make_gateway()
    routed = _route(gw, json.dumps({"prompt": [[4, 5, 6], [1]]}).encode())
    assert routed.decision.endpoint.id == "vllm-2"
    assert calls(controller, "/lookup") == [{"tokens": [4, 5, 6]}]
    assert paths(engine) == []


def test_seed_object_form_layout(make_gateway, controller) -> None:
    controller.seed_form = True
    controller.layout = {"vllm-1": 2, "vllm-2": 8}
    routed = _route(make_gateway())
    assert (routed.decision.endpoint.id, routed.decision.matched_tokens) == ("vllm-2", 8)


def test_slow_controller_falls_back_within_the_budget(make_gateway, controller) -> None:
    controller.delay = 0.6
    gw = make_gateway({"lookup_routing_timeout": "150ms"})
    start = time.monotonic()
    routed = _route(gw)
    assert time.monotonic() - start < 0.15 + 0.25
    assert routed.decision.reason == routing.FALLBACK
    assert routed.decision.detail.startswith("lookup")
    assert len(calls(controller, "/lookup")) == 1
    assert gw.helpers.lmcache_breaker.snapshot()["consecutive_failures"] == 1


def test_slow_tokenizer_falls_back_without_lookup(make_gateway, engine, controller) -> None:
    engine.delay = 0.6
    gw = make_gateway({"lookup_routing_timeout": "150ms"})
    start = time.monotonic()
    routed = _route(gw)
    assert time.monotonic() - start < 0.15 + 0.25
    assert routed.decision.reason == routing.FALLBACK
    assert routed.decision.detail.startswith("tokenize")
    assert paths(controller) == []


def test_lookup_5xx_is_not_retried_on_the_request_path(make_gateway, controller) -> None:
    controller.layout = {"vllm-1": 9}
    controller.script["/lookup"] = [502]
    gw = make_gateway()
    routed = _route(gw)
    assert routed.decision.reason == routing.FALLBACK
    assert len(calls(controller, "/lookup")) == 1
    assert gw.counters.get("lookup.routing_failed") == 1
    routed = _route(gw)  # the next request goes through
    assert routed.decision.reason == routing.CACHE


def test_lookup_4xx_falls_back_and_proves_the_helper_alive(make_gateway, controller) -> None:
    controller.script["/lookup"] = [422]
    gw = make_gateway({"circuit_breaker": {"failure_threshold": 1}})
    routed = _route(gw)
    assert routed.decision.reason == routing.FALLBACK
    assert gw.helpers.lmcache_breaker.state is State.CLOSED


def test_tokenize_error_does_not_populate_the_cache(make_gateway, engine) -> None:
    engine.status = 500
    gw = make_gateway()
    routed = _route(gw)
    assert routed.decision.reason == routing.FALLBACK
    assert "status 500" in routed.decision.detail
    assert len(gw.token_cache) == 0
    assert len(engine.raw_tokenize) == 1


def test_open_breaker_means_no_calls(make_gateway, engine, controller) -> None:
    gw = make_gateway({"circuit_breaker": {"failure_threshold": 1, "recovery_timeout": "1m"}})
    gw.helpers.tokenizer_breaker.failure()
    routed = _route(gw)
    assert routed.decision.reason == routing.FALLBACK
    assert "breaker" in routed.decision.detail
    assert paths(engine) == [] and paths(controller) == []


def test_concurrent_requests_wait_in_parallel(make_gateway, controller) -> None:
    controller.layout = {"vllm-2": 7}
    controller.delay = 0.2
    gw = make_gateway()

    async def many() -> list:
        bodies = [json.dumps({"prompt": [i, i + 1]}).encode() for i in range(8)]
        try:
            return await asyncio.gather(*(gw.route_async("vllm", b) for b in bodies))
        finally:
            gw.helpers.aio_lmcache.close()

    start = time.monotonic()
    results = asyncio.run(many())
    elapsed = time.monotonic() - start
    assert [r.decision.endpoint.id for r in results] == ["vllm-2"] * 8
    assert len(calls(controller, "/lookup")) == 8
    assert elapsed < 8 * 0.2 / 2  # not one after another


def test_large_body_is_parsed_off_the_loop_and_still_routes(make_gateway, controller) -> None:
    prompt = " ".join(f"w{i}" for i in range(PARSE_INLINE_MAX // 4))
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    assert len(body) > PARSE_INLINE_MAX
    controller.layout = {"vllm-1": 256}
    routed = _route(make_gateway({"lookup_routing_timeout": "2s"}), body)
    assert routed.decision.reason == routing.CACHE
    assert routed.parsed.prompt == prompt


def test_unparsable_body_makes_no_calls(make_gateway, engine, controller) -> None:
    gw = make_gateway()
    routed = _route(gw, b"\x00not json")
    assert routed.decision.reason == routing.BALANCER
    assert paths(engine) == [] and paths(controller) == []


def test_keep_alive_connection_is_reused_within_a_loop(make_gateway, controller) -> None:
    controller.layout = {"vllm-1": 2}
    gw = make_gateway()

    async def three() -> list:
        try:
            out = []
            for i in range(3):
                out.append(await gw.route_async("vllm", json.dumps({"prompt": [i]}).encode()))
            return out
        finally:
            gw.helpers.aio_lmcache.close()

    results = asyncio.run(three())
    assert [r.decision.reason for r in results] == [routing.CACHE] * 3
    assert len(calls(controller, "/lookup")) == 3
    assert len(controller.peers) == 3
    assert len(set(controller.peers)) == 1  # one keep-alive connection for all three


def test_connection_closed_by_the_server_is_not_reused(make_gateway, controller) -> None:
    controller.layout = {"vllm-1": 2}
    gw = make_gateway()

    async def two() -> list:
        try:
            first = await gw.route_async("vllm", json.dumps({"prompt": [1]}).encode())
            controller.handlers[-1].connection.shutdown(socket.SHUT_RDWR)  # server hangs up
            await asyncio.sleep(0.05)
            second = await gw.route_async("vllm", json.dumps({"prompt": [2]}).encode())
            return [first, second]
        finally:
            gw.helpers.aio_lmcache.close()

    results = asyncio.run(two())
    assert [r.decision.reason for r in results] == [routing.CACHE] * 2
    assert len(set(controller.peers)) == 2
    assert gw.helpers.lmcache_breaker.snapshot()["consecutive_failures"] == 0


def test_close_after_the_event_loop_ended(engine, controller) -> None:
    controller.layout = {"vllm-1": 2}
    gw = Gateway(from_mapping(gateway_doc(engine.url, controller.url)))
    try:
        routed = asyncio.run(gw.route_async("vllm", json.dumps({"prompt": [1]}).encode()))
        assert routed.decision.reason == routing.CACHE
        gw.close()
    finally:
        gw.helpers.aio_tokenizer._idle.clear()
        gw.helpers.aio_lmcache._idle.clear()
        gw.cache.pool.shutdown()
        gw.routing_pool.shutdown(wait=False)
        gw.helpers.pool.clear()
