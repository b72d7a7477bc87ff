"""Ports of the seed's Go tests (handlers_test, lmcache_client_test, strategy_test,
token_manager_test) onto kvgate's Python pieces and the in-process stubs."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kvgate.cache_management import strategy
from kvgate.cache_management.process_load import LoadMetrics
from kvgate.clients.breaker import BreakerOpen, CircuitBreaker, State
from kvgate.clients.deadline import Cancelled, Deadline
from kvgate.clients.http import CallError, HelperClient
from kvgate.clients.tokenizer import Tokenizer
from kvgate.config import CacheStrategyConfig
from kvgate.placement.layout import Placement
from kvgate.policies import base as routing
from kvgate.request.parsing import NotParsed, cache_key, parse_body
from kvgate.sim.stub import tokenize_request

from unit_support import FakeClock, calls, make_transport, paths

# ------------------------------------------------------------ handlers_test.go


@pytest.mark.parametrize(
    ("body", "want_prompt", "want_model"),
    [
        pytest.param(b'{"model":"m1","prompt":"hello"}', "hello", "m1", id="prompt field"),
        pytest.param(b'{"model":"m2","prompt":["a","b"]}', "a\nb", "m2", id="prompt array"),
        pytest.param(
            b'{"model":"m3","messages":[{"role":"user","content":"hi"},'
            b'{"role":"assistant","content":"there"}]}',
            "hi\nthere",
            "m3",
            id="messages fallback",
        ),
    ],
)
def test_extract_prompt_and_model(body: bytes, want_prompt: str, want_model: str) -> None:
    parsed = parse_body(body, "default-model")
    assert parsed.prompt == want_prompt
    assert parsed.model == want_model
    assert parsed.token_ids is None
    assert parsed.key_text == want_prompt


def test_extract_prompt_invalid_json() -> None:
    with pytest.raises(NotParsed):
        parse_body(b'{"model":', "default-model")


def test_missing_model_takes_default_model() -> None:
    parsed = parse_body(b'{"prompt":"hello"}', "fallback-model")
    assert parsed.model == "fallback-model"


def test_try_route_to_cached_instance(make_gateway, controller, engine) -> None:
    """Seed: routes to node-b (8 tokens) over node-a (2); an uncached prompt does no lookup."""
    controller.seed_form = True  # the seed's {"0": location, "1": tokens} object form
    controller.layout = {"node-a": 2, "node-b": 8}
    gw = make_gateway({"route_on_miss": False, "lookup_routing_timeout": "100ms"},
                      endpoint_ids=("node-a", "node-b"))
    gw.token_cache.put(cache_key("m1", "prompt-1"), [1, 2, 3])

    routed = gw.route("vllm", b'{"model":"m1","prompt":"prompt-1"}')
    assert routed.decision.reason == routing.CACHE
    assert routed.decision.endpoint.id == "node-b"
    assert routed.decision.matched_tokens == 8
    assert len(calls(controller, "/lookup")) == 1
    assert calls(controller, "/lookup")[0]["tokens"] == [1, 2, 3]

    routed = gw.route("vllm", b'{"model":"m1","prompt":"prompt-2"}')
    assert routed.decision.reason == routing.BALANCER
    assert routed.decision.matched_tokens == 0
    assert routed.tokens is None
    assert len(calls(controller, "/lookup")) == 1
    assert calls(engine, "/tokenize") == []


# ------------------------------------------------------------ lmcache_client_test.go


def test_lmcache_client_retry_success(controller, lmcache_factory) -> None:
    controller.script["/lookup"] = [502, 502]
    controller.seed_form = True
    controller.location = "mem0"
    controller.layout = {"node-a": 6}
    lm = lmcache_factory(max_attempts=3, base_backoff=0.001, max_backoff=0.002)

    placements = lm.lookup([1, 2], Deadline(5.0))

    assert len(calls(controller, "/lookup")) == 3
    assert all(body == {"tokens": [1, 2]} for body in calls(controller, "/lookup"))
    assert placements == [Placement("node-a", "mem0", 6)]
    assert lm.client.breaker.state is State.CLOSED
    assert lm.client.breaker.snapshot()["consecutive_failures"] == 0


def test_lmcache_client_gives_up_after_max_attempts(controller, lmcache_factory) -> None:
    controller.script["/lookup"] = [502] * 5
    lm = lmcache_factory(max_attempts=3)
    with pytest.raises(CallError) as info:
        lm.lookup([1, 2], Deadline(5.0))
    assert info.value.status == 502
    assert len(calls(controller, "/lookup")) == 3


def test_lmcache_client_deadline_during_backoff(controller, lmcache_factory) -> None:
    """Seed: a 20 ms context against a 100 ms backoff ends the retry; here 300 ms vs 1 s."""
    controller.script["/pin"] = [502, 502, 502]
    lm = lmcache_factory(max_attempts=3, base_backoff=1.0, max_backoff=1.0)
    start = time.monotonic()
    with pytest.raises(CallError):
        lm.pin("i", "loc", [1], Deadline(0.3))
    assert time.monotonic() - start < 0.3
    assert len(calls(controller, "/pin")) == 1


def test_lmcache_client_cancel_during_backoff(controller, lmcache_factory) -> None:
    controller.script["/pin"] = [502, 502, 502]
    lm = lmcache_factory(max_attempts=3, base_backoff=2.0, max_backoff=2.0)
    cancel = threading.Event()
    timer = threading.Timer(0.1, cancel.set)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises((CallError, Cancelled)):
            lm.pin("i", "loc", [1], Deadline(10.0, cancel))
    finally:
        timer.cancel()
    assert time.monotonic() - start < 1.0
    assert len(calls(controller, "/pin")) == 1


def test_lmcache_client_cancelled_before_call_makes_no_call(controller, lmcache_factory) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        lmcache_factory(max_attempts=3).pin("i", "loc", [1], Deadline(5.0, cancel))
    assert paths(controller) == []


def test_lmcache_client_circuit_breaker_open(controller, lmcache_factory) -> None:
    clock = FakeClock()
    cb = CircuitBreaker("lmcache", 1, 60.0, 1, clock=clock)
    cb.failure()
    assert cb.state is State.OPEN
    lm = lmcache_factory(max_attempts=2, breaker=cb)
    with pytest.raises(BreakerOpen):
        lm.evict("i", [1], Deadline(5.0))
    assert paths(controller) == []
    assert cb.rejected == 1


# ------------------------------------------------------------ strategy_test.go


def test_cache_strategy_make_decision() -> None:
    cfg = CacheStrategyConfig(
        enable_compression=True,
        enable_eviction=True,
        enable_pinning=True,
        load_threshold=0.0,
        memory_threshold=0.0000001,
        hot_content_threshold=2,
    )
    decision = strategy.decide(cfg, LoadMetrics(cpu=0.9, memory=0.5), hot=True)
    assert decision.pin
    assert decision.evict
    assert not decision.compress  # load_threshold 0 means off
    assert decision.reason == "hot_content"
    assert decision.any


@pytest.mark.parametrize(
    ("load", "hot", "want"),
    [
        (LoadMetrics(cpu=0.8, memory=0.1), False, (True, False, False, "high_load")),
        (LoadMetrics(cpu=0.8, memory=0.9), False, (True, False, True, "memory_threshold")),
        (LoadMetrics(cpu=0.1, memory=0.1), True, (False, True, False, "hot_content")),
        (LoadMetrics(cpu=0.1, memory=0.1), False, (False, False, False, "")),
    ],
)
def test_decision_rules_and_reason_precedence(load, hot, want) -> None:
    cfg = CacheStrategyConfig(enable_compression=True, enable_eviction=True,
                              enable_pinning=True, load_threshold=0.7, memory_threshold=0.8)
    d = strategy.decide(cfg, load, hot)
    assert (d.compress, d.pin, d.evict, d.reason) == want


def test_decision_respects_disabled_actions() -> None:
    cfg = CacheStrategyConfig(load_threshold=0.1, memory_threshold=0.1)
    d = strategy.decide(cfg, LoadMetrics(cpu=1.0, memory=1.0), hot=True)
    assert not d.any


def _strategy_cfg() -> CacheStrategyConfig:
    return CacheStrategyConfig(
        compress_instance_id="compress-i",
        compress_location="loc-a",
        compress_method="zstd",
        pin_instance_id="pin-i",
        pin_location="loc-b",
        evict_instance_id="evict-i",
    )


def test_cache_strategy_execute_decision_order(controller, lmcache_factory) -> None:
    controller.has_evict = True
    decision = strategy.Decision(compress=True, pin=True, evict=True)
    results = strategy.execute(decision, [1, 2], _strategy_cfg(), lmcache_factory(),
                               Deadline(5.0))
    assert [(r.action, r.result) for r in results] == [
        ("compress", "ok"), ("pin", "ok"), ("evict", "ok")]
    assert paths(controller) == ["/compress", "/pin", "/evict"]
    assert calls(controller, "/compress") == [
        {"instance_id": "compress-i", "location": "loc-a", "method": "zstd", "tokens": [1, 2]}]
    assert calls(controller, "/pin") == [
        {"instance_id": "pin-i", "location": "loc-b", "tokens": [1, 2]}]
    assert calls(controller, "/evict") == [{"instance_id": "evict-i", "tokens": [1, 2]}]


def test_cache_strategy_execute_stops_on_first_error(controller, lmcache_factory) -> None:
    controller.has_evict = True
    controller.script["/compress"] = [500]
    decision = strategy.Decision(compress=True, pin=True, evict=True)
    results = strategy.execute(decision, [1, 2], CacheStrategyConfig(compress_method="zstd"),
                               lmcache_factory(max_attempts=1), Deadline(5.0))
    assert [(r.action, r.result) for r in results] == [("compress", "error")]
    assert paths(controller) == ["/compress"]


def test_cache_strategy_pin_error_skips_evict(controller, lmcache_factory) -> None:
    controller.has_evict = True
    controller.script["/pin"] = [500]
    decision = strategy.Decision(compress=True, pin=True, evict=True)
    results = strategy.execute(decision, [3], _strategy_cfg(), lmcache_factory(max_attempts=1),
                               Deadline(5.0))
    assert [(r.action, r.result) for r in results] == [("compress", "ok"), ("pin", "error")]
    assert paths(controller) == ["/compress", "/pin"]


def test_cache_strategy_open_breaker_is_an_error(controller, lmcache_factory) -> None:
    cb = CircuitBreaker("lmcache", 1, 60.0, 1, clock=FakeClock())
    cb.failure()
    decision = strategy.Decision(compress=True, pin=True)
    results = strategy.execute(decision, [3], _strategy_cfg(), lmcache_factory(breaker=cb),
                               Deadline(5.0))
    assert [(r.action, r.result) for r in results] == [("compress", "error")]
    assert paths(controller) == []


# ------------------------------------------------------------ token_manager_test.go


def test_token_manager_get_tokens_uses_cache(make_gateway, engine) -> None:
    gw = make_gateway({"token_cache": {"enabled": True, "max_size": 10, "ttl": "1m"}})
    body = b'{"model":"m1","prompt":"hello world"}'
    first = gw.route("vllm", body)
    second = gw.route("vllm", body)
    want = tuple(tokenize_request(json.loads(body)))
    assert first.tokens == want
    assert second.tokens == want
    assert len(calls(engine, "/tokenize")) == 1
    stats = gw.token_cache.snapshot()
    assert (stats["size"], stats["hits"], stats["misses"]) == (1, 1, 1)
    assert stats["hit_rate"] == 0.5


def test_token_manager_raw_body_is_passed_through(engine) -> None:
    cb = CircuitBreaker("tokenizer", 5, 10.0, 2)
    tokenizer = Tokenizer(HelperClient("tokenizer", engine.url, make_transport(), cb))
    raw = b'{ "model" : "raw-model",\n  "prompt": "raw prompt",  "extra": [1, {"x": null}] }'
    tokens = tokenizer.tokenize(raw, Deadline(5.0))
    assert engine.raw_tokenize == [raw]
    assert tokens == tuple(tokenize_request(json.loads(raw)))


def test_token_manager_status_error_does_not_populate_cache(make_gateway, engine) -> None:
    engine.status = 500
    gw = make_gateway()
    routed = gw.route("vllm", b'{"model":"m1","prompt":"p1"}')
    assert routed.decision.reason == routing.FALLBACK
    assert "status 500" in routed.decision.detail
    assert routed.tokens is None
    assert len(gw.token_cache) == 0
    assert len(calls(engine, "/tokenize")) == 1  # the tokenizer is not retried

    results = gw.cache.manage(gw.job(routed), threading.Event())
    assert results == []
    assert len(gw.token_cache) == 0
    assert gw.counters.get("background.failed") == 1


def test_tokenizer_status_error_names_the_status(engine) -> None:
    engine.status = 500
    cb = CircuitBreaker("tokenizer", 5, 10.0, 2)
    tokenizer = Tokenizer(HelperClient("tokenizer", engine.url, make_transport(), cb))
    with pytest.raises(CallError) as info:
        tokenizer.tokenize(b'{"prompt":"p1"}', Deadline(5.0))
    assert info.value.status == 500
    assert "status 500" in str(info.value)
    assert info.value.retryable
