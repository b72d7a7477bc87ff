"""Gateway.route and cache management (gw.cache) against in-process loopback stubs."""

from __future__ import annotations

import json
import threading
import time

from kvgate.cache_management.process_load import LoadMetrics
from kvgate.cache_management.strategy import ActionResult
from kvgate.policies import base as routing
from kvgate.request.parsing import cache_key
from kvgate.sim.stub import CHUNK, tokenize_request, tokenize_text

from unit_support import calls, paths, wait_for

PROMPT = " ".join(f"word{i}" for i in range(300))
BODY = json.dumps({"model": "m", "prompt": PROMPT}).encode()
PIN = {"enable_pinning": True, "pin_instance_id": "vllm-2", "pin_location": "LocalCPUBackend"}


def _body(**payload: object) -> bytes:
    return json.dumps(payload).encode()


# ------------------------------------------------------------ routing


def test_first_sight_routes_by_cache_within_budget(make_gateway, engine, controller) -> None:
    tokens = tokenize_text(PROMPT)
    controller.holdings = {"vllm-1": [tokens[:CHUNK] + [1] * 50], "vllm-2": [tokens]}
    gw = make_gateway()
    budget = gw.routing_budget

    start = time.monotonic()
    routed = gw.route("vllm", BODY)
    elapsed = time.monotonic() - start

    assert routed.decision.reason == routing.CACHE
    assert routed.decision.endpoint.id == "vllm-2"
    assert routed.decision.matched_tokens == len(tokens)
    assert elapsed < budget
    assert engine.raw_tokenize == [BODY]
    assert [c["tokens"] for c in calls(controller, "/lookup")] == [tokens]
    assert routed.tokens == tuple(tokens)
    assert {p.instance_id: p.tokens for p in routed.placements} == {"vllm-1": CHUNK,
                                                                   "vllm-2": len(tokens)}
    assert gw.counters.get("routes.cache") == 1
    assert gw.counters.get("tokenize.routing_ok") == 1

    again = gw.route("vllm", BODY)  # tokens now come from the token cache
    assert again.decision.endpoint.id == "vllm-2"
    assert len(engine.raw_tokenize) == 1
    assert len(calls(controller, "/lookup")) == 2


def test_next_chat_turn_routes_to_the_holder_of_the_earlier_turn(make_gateway,
                                                                  controller) -> None:
    turn1 = [{"role": "user", "content": PROMPT}]
    turn2 = turn1 + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    controller.holdings = {"vllm-3": [tokenize_request({"messages": turn1})]}
    gw = make_gateway()
    routed = gw.route("vllm", _body(model="m", messages=turn2))
    assert routed.decision.reason == routing.CACHE
    assert routed.decision.endpoint.id == "vllm-3"
    assert routed.decision.matched_tokens == CHUNK  # whole chunks of the shared prefix

    seed_rule = make_gateway({"route_on_miss": False})
    routed = seed_rule.route("vllm", _body(model="m", messages=turn2))
    assert routed.decision.reason == routing.BALANCER
    assert routed.decision.detail == "token cache miss"


def test_array_form_layout_routes_to_the_longest(make_gateway, controller) -> None:
    controller.layout = {"vllm-1": 2, "vllm-3": 8, "vllm-2": 5}
    gw = make_gateway()
    routed = gw.route("vllm", BODY)
    assert (routed.decision.endpoint.id, routed.decision.matched_tokens) == ("vllm-3", 8)


def test_tie_goes_to_fewer_in_flight_then_config_order(make_gateway, controller) -> None:
    controller.layout = {"vllm-3": 8, "vllm-1": 8}
    gw = make_gateway()
    assert gw.route("vllm", BODY).decision.endpoint.id == "vllm-1"
    gw.fleet.clusters["vllm"].begin("vllm-1")
    assert gw.route("vllm", BODY).decision.endpoint.id == "vllm-3"
    gw.fleet.clusters["vllm"].end("vllm-1")
    assert gw.route("vllm", BODY).decision.endpoint.id == "vllm-1"


def test_unhealthy_or_unknown_holders_are_skipped(make_gateway, controller) -> None:
    controller.layout = {"ghost": 500, "vllm-2": 8, "vllm-1": 2}
    gw = make_gateway()
    gw.fleet.health.mark_down("vllm-2")
    routed = gw.route("vllm", BODY)
    assert (routed.decision.reason, routed.decision.endpoint.id) == (routing.CACHE, "vllm-1")

    controller.layout = {"ghost": 500, "vllm-2": 8}
    routed = gw.route("vllm", BODY)
    assert routed.decision.reason == routing.BALANCER
    assert routed.decision.detail == "holder unknown or unhealthy"
    assert routed.decision.endpoint.id != "vllm-2"  # the balancer skips it too


def test_nothing_cached_uses_round_robin(make_gateway, controller) -> None:
    gw = make_gateway()
    seen = []
    for _ in range(6):
        routed = gw.route("vllm", BODY)
        assert routed.decision.reason == routing.BALANCER
        assert routed.decision.detail == "no cached prefix"
        seen.append(routed.decision.endpoint.id)
    assert seen[:3] == seen[3:]
    assert sorted(seen[:3]) == ["vllm-1", "vllm-2", "vllm-3"]


def test_token_id_prompts_skip_tokenize(make_gateway, engine, controller) -> None:
    controller.layout = {"vllm-3": 3}
    gw = make_gateway()
    routed = gw.route("vllm", _body(model="m", prompt=[1, 2, 3]))
    assert routed.decision.endpoint.id == "vllm-3"
    routed = gw.route("vllm", _body(model="m", prompt=[[5, 6, 7], [8, 9]]))
    assert routed.tokens == (5, 6, 7)
    assert [c["tokens"] for c in calls(controller, "/lookup")] == [[1, 2, 3], [5, 6, 7]]
    assert engine.raw_tokenize == []
    assert paths(engine) == []


def test_token_id_prompts_route_even_without_route_on_miss(make_gateway, engine,
                                                           controller) -> None:
    controller.layout = {"vllm-2": 3}
    gw = make_gateway({"route_on_miss": False})
    routed = gw.route("vllm", _body(prompt=[4, 5, 6]))
    assert routed.decision.reason == routing.CACHE
    assert paths(engine) == []


def test_chat_content_parts_are_keyed_on_their_text(make_gateway, engine) -> None:
    body = _body(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "part one"},
        {"type": "image_url", "image_url": {"url": "http://x/i.png"}},
        {"type": "text", "text": "part two"},
    ]}])
    gw = make_gateway()
    routed = gw.route("vllm", body)
    assert routed.parsed.prompt == "part one\npart two"
    assert routed.key == cache_key("m", "part one\npart two")
    assert engine.raw_tokenize == [body]  # the engine tokenizes the chat itself
    assert routed.tokens == tuple(tokenize_request(json.loads(body)))


def test_unparsable_body_goes_to_the_balancer_without_calls(make_gateway, engine,
                                                            controller) -> None:
    gw = make_gateway()
    routed = gw.route("vllm", b'{"model":')
    assert routed.decision.reason == routing.BALANCER
    assert routed.parsed is None
    assert gw.counters.get("requests.not_parsed") == 1
    assert paths(engine) == [] and paths(controller) == []


def test_slow_controller_falls_back_within_the_budget(make_gateway, controller) -> None:
    controller.delay = 0.6
    gw = make_gateway({"lookup_routing_timeout": "150ms"})
    start = time.monotonic()
    routed = gw.route("vllm", BODY)
    elapsed = time.monotonic() - start
    assert routed.decision.reason == routing.FALLBACK
    assert routed.decision.detail.startswith("lookup")
    assert elapsed < 0.15 + 0.25
    assert len(calls(controller, "/lookup")) == 1  # no retry past the budget
    assert gw.counters.get("lookup.routing_failed") == 1


def test_slow_tokenizer_falls_back_within_the_budget(make_gateway, engine, controller) -> None:
    engine.delay = 0.6
    gw = make_gateway({"lookup_routing_timeout": "150ms"})
    start = time.monotonic()
    routed = gw.route("vllm", BODY)
    assert time.monotonic() - start < 0.15 + 0.25
    assert routed.decision.reason == routing.FALLBACK
    assert routed.decision.detail.startswith("tokenize")
    assert paths(controller) == []


def test_open_breaker_falls_back_without_calls(make_gateway, controller) -> None:
    gw = make_gateway({"circuit_breaker": {"failure_threshold": 2, "recovery_timeout": "1m"}})
    gw.helpers.lmcache_breaker.failure()
    gw.helpers.lmcache_breaker.failure()
    routed = gw.route("vllm", BODY)
    assert routed.decision.reason == routing.FALLBACK
    assert paths(controller) == []


# ------------------------------------------------------------ background cache management


def test_pins_hot_content_after_threshold_sightings(make_gateway, engine, controller) -> None:
    gw = make_gateway({"route_on_miss": False,
                       "cache_strategy": {**PIN, "hot_content_threshold": 3}})
    for sighting in (1, 2):
        routed = gw.route("vllm", BODY)
        assert gw.cache.manage(gw.job(routed), threading.Event()) == []
        assert calls(controller, "/pin") == [], sighting
    routed = gw.route("vllm", BODY)
    assert gw.cache.manage(gw.job(routed), threading.Event()) == [ActionResult("pin", "ok")]
    assert calls(controller, "/pin") == [{"instance_id": "vllm-2", "location": "LocalCPUBackend",
                                          "tokens": tokenize_text(PROMPT)}]
    assert len(engine.raw_tokenize) == 1  # tokenized once, in the background, then cached
    assert gw.counters.get("actions.pin_ok") == 1


def test_background_submission_reaches_the_controller(make_gateway, controller) -> None:
    gw = make_gateway({"cache_strategy": {**PIN, "hot_content_threshold": 1}})
    routed = gw.route("vllm", _body(prompt=[9, 8, 7]))
    assert gw.background(routed, threading.Event()) is not None
    assert wait_for(lambda: len(calls(controller, "/pin")) == 1)
    assert calls(controller, "/pin")[0]["instance_id"] == "vllm-2"
    assert calls(controller, "/pin")[0]["tokens"] == [9, 8, 7]
    assert wait_for(lambda: gw.cache.pool.pending == 0)
    assert gw.counters.get("actions.pin_ok") == 1


def test_cancelled_before_start_makes_no_calls(make_gateway, engine, controller) -> None:
    gw = make_gateway({"route_on_miss": False, "cache_strategy": {**PIN,
                                                                  "hot_content_threshold": 1}})
    routed = gw.route("vllm", BODY)
    cancel = threading.Event()
    cancel.set()
    assert gw.cache.manage(gw.job(routed), cancel) == []
    assert gw.counters.get("background.cancelled") == 1
    assert paths(engine) == [] and paths(controller) == []


def test_cancel_during_lookup_stops_before_pinning(make_gateway, controller) -> None:
    gw = make_gateway({"route_on_miss": False, "cache_strategy": {**PIN,
                                                                  "hot_content_threshold": 1}})
    routed = gw.route("vllm", BODY)
    controller.delay = 0.4
    cancel = threading.Event()
    timer = threading.Timer(0.1, cancel.set)
    timer.start()
    start = time.monotonic()
    try:
        assert gw.cache.manage(gw.job(routed), cancel) == []
    finally:
        timer.cancel()
    assert time.monotonic() - start < 1.5
    assert paths(controller) == ["/lookup"]
    assert gw.counters.get("background.cancelled") == 1


def test_missing_evict_is_counted_and_switched_off(make_gateway, controller) -> None:
    gw = make_gateway({"signals": "process",  # the seed's memory signal drives evict
                       "cache_strategy": {**PIN, "hot_content_threshold": 1,
                                          "enable_eviction": True, "memory_threshold": 0.5,
                                          "evict_instance_id": "vllm-1"}})
    gw.cache.process_load.snapshot = lambda: LoadMetrics(cpu=0.0, memory=0.9)
    for _ in range(3):
        routed = gw.route("vllm", BODY)
        results = gw.cache.manage(gw.job(routed), threading.Event())
        assert results == [ActionResult("pin", "ok"), ActionResult("evict", "unsupported")]
    assert len(calls(controller, "/evict")) == 1
    assert len(calls(controller, "/pin")) == 3
    assert gw.counters.get("actions.evict_unsupported") == 3
    stats = gw.stats()
    assert stats["unsupported_actions"] == {"evict": 404}
    assert stats["breakers"]["lmcache"]["state"] == "closed"


def test_background_full_drops_and_counts(make_gateway) -> None:
    gw = make_gateway({"background_workers": 1, "background_queue": 0,
                       "cache_strategy": {**PIN, "hot_content_threshold": 5}})
    release = threading.Event()
    try:
        assert gw.cache.pool.submit(lambda: release.wait(5))
        routed = gw.route("vllm", _body(prompt=[1, 2]))
        assert gw.background(routed, threading.Event()) is None
        assert gw.counters.get("background.dropped") == 1
    finally:
        release.set()
    assert wait_for(lambda: gw.cache.pool.pending == 0)


def test_nothing_is_queued_for_unparsed_requests_or_after_close(make_gateway) -> None:
    gw = make_gateway()
    unparsed = gw.route("vllm", b"not json")
    assert gw.background(unparsed, threading.Event()) is None
    routed = gw.route("vllm", _body(prompt=[1]))
    gw.close()
    assert gw.background(routed, threading.Event()) is None
    assert gw.cache.pool.submitted == 0


def test_background_is_skipped_only_when_nothing_is_left_to_do(make_gateway, engine) -> None:
    gw = make_gateway({"route_on_miss": False})  # no cache action enabled
    known = gw.route("vllm", _body(prompt=[1, 2]))
    assert gw.background(known, threading.Event()) is None  # tokens known already
    unknown = gw.route("vllm", BODY)
    assert unknown.tokens is None
    assert gw.background(unknown, threading.Event()) is not None  # fills the token cache
    assert wait_for(lambda: len(gw.token_cache) == 1)
    assert engine.raw_tokenize == [BODY]
    assert gw.cache.pool.submitted == 1
