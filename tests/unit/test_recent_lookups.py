"""A prompt seen again within lookup_cache_ttl reuses its lookup answer, with the gateway's
own routing of it overlaid; the first expiry stands, so staleness stays bounded."""

from __future__ import annotations

import json
import time

from kvgate import routing
from kvgate.lmcache import Placement

from unit_support import calls


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
    gw = make_gateway({"lookup_cache_ttl": "300ms"})
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
        gw._overlay("k", [Placement("a", "LocalCPUBackend", 900), Placement("b", "X", 10)],
                    "a", 500)
        got = {p.instance_id: (p.location, p.tokens) for p in gw._recent("k") or []}
        assert got == {"a": ("LocalCPUBackend", 900), "b": ("X", 10)}
    finally:
        gw.close()
