"""Helper calls: what is retried, what switches an action off, what opens the breaker."""

from __future__ import annotations

import threading
import time

import pytest

from kvgate.cache_management import strategy
from kvgate.clients.breaker import BreakerOpen, CircuitBreaker, State
from kvgate.clients.deadline import Cancelled, Deadline
from kvgate.clients.http import CallError, HelperClient, Unsupported, backoff_delay
from kvgate.config import CacheStrategyConfig, RetryConfig

from unit_support import calls, make_transport, paths

CFG = CacheStrategyConfig(pin_instance_id="vllm-1", pin_location="LocalCPUBackend",
                          evict_instance_id="vllm-1", compress_instance_id="vllm-2",
                          compress_location="LocalCPUBackend")


def test_missing_evict_is_switched_off_after_the_first_answer(controller,
                                                              lmcache_factory) -> None:
    """The stock stub, like the real controller, has no /evict (404)."""
    cb = CircuitBreaker("lmcache", 1, 60.0, 1)  # a single failure would open it
    lm = lmcache_factory(max_attempts=3, breaker=cb)
    decision = strategy.Decision(pin=True, evict=True)
    for _ in range(4):
        results = strategy.execute(decision, [1, 2], CFG, lm, Deadline(5.0))
        # the missing /evict never blocks the pin before it
        assert [(r.action, r.result) for r in results] == [("pin", "ok"),
                                                           ("evict", "unsupported")]
    assert len(calls(controller, "/evict")) == 1  # never retried, never asked again
    assert len(calls(controller, "/pin")) == 4
    assert lm.unsupported == {"evict": 404}
    assert lm.unsupported_answers == 1
    assert not lm.supports("evict") and lm.supports("pin")
    assert cb.state is State.CLOSED
    assert cb.times_opened == 0


def test_switched_off_action_raises_without_a_call(controller, lmcache_factory) -> None:
    lm = lmcache_factory(max_attempts=3)
    with pytest.raises(Unsupported) as first:
        lm.evict("vllm-1", [1], Deadline(5.0))
    assert first.value.status == 404
    with pytest.raises(Unsupported):
        lm.evict("vllm-1", [1], Deadline(5.0))
    assert paths(controller) == ["/evict"]


def test_405_also_switches_the_action_off(controller, lmcache_factory) -> None:
    controller.script["/compress"] = [405]
    lm = lmcache_factory(max_attempts=3)
    decision = strategy.Decision(compress=True, pin=True)
    for _ in range(3):
        results = strategy.execute(decision, [7], CFG, lm, Deadline(5.0))
        assert [(r.action, r.result) for r in results] == [("compress", "unsupported"),
                                                           ("pin", "ok")]
    assert lm.unsupported == {"compress": 405}
    assert len(calls(controller, "/compress")) == 1
    assert lm.client.breaker.state is State.CLOSED


@pytest.mark.parametrize("status", [400, 409, 422, 429])
def test_4xx_is_not_retried_and_keeps_the_breaker_closed(controller, lmcache_factory,
                                                         status: int) -> None:
    controller.script["/pin"] = [status] * 3
    cb = CircuitBreaker("lmcache", 1, 60.0, 1)
    lm = lmcache_factory(max_attempts=3, breaker=cb)
    with pytest.raises(CallError) as info:
        lm.pin("vllm-1", "L", [1], Deadline(5.0))
    assert info.value.status == status
    assert not info.value.retryable
    assert not isinstance(info.value, Unsupported)
    assert len(calls(controller, "/pin")) == 1
    assert cb.state is State.CLOSED
    assert lm.supports("pin")  # a refusal is not "unsupported"


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_retried_and_counts_against_the_breaker(controller, lmcache_factory,
                                                       status: int) -> None:
    controller.script["/pin"] = [status] * 3
    cb = CircuitBreaker("lmcache", 5, 60.0, 1)
    lm = lmcache_factory(max_attempts=3, breaker=cb)
    with pytest.raises(CallError) as info:
        lm.pin("vllm-1", "L", [1], Deadline(5.0))
    assert info.value.status == status and info.value.retryable
    assert len(calls(controller, "/pin")) == 3
    assert cb.snapshot()["consecutive_failures"] == 3
    assert cb.state is State.CLOSED


def test_breaker_opens_mid_retry_and_stops_calls(controller, lmcache_factory) -> None:
    controller.script["/pin"] = [500] * 5
    cb = CircuitBreaker("lmcache", 2, 60.0, 1)
    lm = lmcache_factory(max_attempts=5, breaker=cb)
    with pytest.raises(BreakerOpen):  # the third attempt finds the breaker open
        lm.pin("vllm-1", "L", [1], Deadline(5.0))
    assert len(calls(controller, "/pin")) == 2
    assert cb.state is State.OPEN


def test_connection_refused_is_a_retryable_error(lmcache_factory, controller) -> None:
    lm = lmcache_factory(max_attempts=2)
    lm.client.base_url = "http://127.0.0.1:1"  # nothing listens on port 1
    with pytest.raises(CallError) as info:
        lm.lookup([1], Deadline(2.0))
    assert info.value.retryable
    assert lm.client.breaker.snapshot()["consecutive_failures"] == 2


def test_unknown_path_is_unsupported(controller, lmcache_factory) -> None:
    lm = lmcache_factory(max_attempts=3)
    with pytest.raises(Unsupported) as info:
        lm.client.post("/no-such-path", {}, Deadline(2.0))
    assert info.value.status == 404
    assert paths(controller) == ["/no-such-path"]


def test_non_json_answer_is_a_retryable_error(engine) -> None:
    """A 200 whose body is not JSON (here the stub engine's SSE stream)."""
    cb = CircuitBreaker("x", 5, 60.0, 1)
    helper = HelperClient("engine", engine.url, make_transport(), cb,
                          RetryConfig(2, 0.001, 0.002))
    with pytest.raises(CallError) as info:
        helper.post("/v1/completions", {"prompt": "a b", "stream": True}, Deadline(2.0))
    assert "not JSON" in str(info.value)
    assert info.value.retryable
    assert len(calls(engine, "/v1/completions")) == 2


# ------------------------------------------------------------ backoff and deadlines


def test_backoff_is_exponential_and_capped() -> None:
    retry = RetryConfig(max_attempts=10, base_backoff=0.1, max_backoff=0.5)
    delays = [backoff_delay(i, retry) for i in range(6)]
    assert delays[:3] == pytest.approx([0.1, 0.2, 0.4])
    assert delays[3:] == [0.5, 0.5, 0.5]
    assert backoff_delay(10_000, retry) == 0.5  # no overflow for huge attempt counts


def test_deadline_sleep_refuses_to_outlast_the_deadline() -> None:
    d = Deadline(0.2)
    start = time.monotonic()
    assert d.sleep(5.0) is False
    assert time.monotonic() - start < 0.1
    assert d.sleep(0.01) is True


def test_deadline_sleep_wakes_on_cancel() -> None:
    cancel = threading.Event()
    d = Deadline(10.0, cancel)
    threading.Timer(0.05, cancel.set).start()
    start = time.monotonic()
    assert d.sleep(5.0) is False
    assert time.monotonic() - start < 1.0
    assert d.done
    with pytest.raises(Cancelled):
        d.check()


def test_expired_deadline_check_raises() -> None:
    d = Deadline(0.0)
    assert d.done
    with pytest.raises(Cancelled):
        d.check()


def test_an_answer_that_touched_no_token_is_a_noop_not_a_success(controller,
                                                                lmcache_factory) -> None:
    """lmcache 0.5.6 answers a compression method it refuses (zstd) with 200 and 0 tokens."""
    lm = lmcache_factory()
    original = controller.serve

    def refusing(h, method, path, body, raw):  # type: ignore[no-untyped-def]
        if path == "/compress":
            h._send(200, {"event_id": "e", "num_tokens": 0})
            return
        original(h, method, path, body, raw)

    controller.serve = refusing
    decision = strategy.Decision(compress=True, pin=True)
    results = strategy.execute(decision, [1, 2], CFG, lm, Deadline(5.0))
    assert [(r.action, r.result) for r in results] == [("compress", "noop"), ("pin", "ok")]
