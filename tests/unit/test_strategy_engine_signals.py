"""Cache management on real signals: the holder's queue, pins on the holder."""

from __future__ import annotations

import threading

from kvgate.cache_management import strategy
from kvgate.config import CacheStrategyConfig
from kvgate.fleet.engine_metrics import EngineStats

from unit_support import calls

BODY = b'{"model": "m", "prompt": [1, 2, 3, 4]}'


def test_engine_busy_means_a_queue_or_slots_in_use() -> None:
    assert strategy.engine_busy(running=1, waiting=2, slots=8, load_threshold=0.9)
    assert strategy.engine_busy(running=8, waiting=0, slots=8, load_threshold=0.9)
    assert not strategy.engine_busy(running=2, waiting=0, slots=8, load_threshold=0.9)
    assert not strategy.engine_busy(running=8, waiting=0, slots=8, load_threshold=0.0)


def test_decide_on_engine_never_evicts_the_served_content() -> None:
    cfg = CacheStrategyConfig(enable_compression=True, enable_pinning=True,
                              enable_eviction=True, hot_content_threshold=1)
    d = strategy.decide_on_engine(cfg, engine_busy=True, hot=True)
    assert (d.compress, d.pin, d.evict, d.reason) == (True, True, False, "hot_content")
    d = strategy.decide_on_engine(cfg, engine_busy=False, hot=False)
    assert not d.any


def test_targets_default_to_the_holder_unless_forced() -> None:
    cfg = CacheStrategyConfig(pin_instance_id="forced")
    t = strategy.Targets.of(cfg, "vllm-3")
    assert (t.pin, t.compress, t.evict) == ("forced", "vllm-3", "vllm-3")


def test_hot_content_is_pinned_on_the_instance_that_holds_it(make_gateway, controller) -> None:
    controller.layout = {"vllm-1": 1, "vllm-3": 4}
    gw = make_gateway({"cache_strategy": {"enable_pinning": True, "hot_content_threshold": 1,
                                          "pin_location": "LocalCPUBackend",
                                          "enable_compression": True, "load_threshold": 0.5}})
    # the holder's /metrics say it is saturated: compress goes there too
    gw.fleet.monitor.stats["vllm-3"] = EngineStats(running=4, waiting=3, kv_usage=0.9,
                                             at=__import__("time").monotonic())
    routed = gw.route("vllm", BODY)
    results = gw.cache.manage(gw.job(routed), threading.Event())
    assert [r.action for r in results] == ["compress", "pin"]
    assert [c["instance_id"] for c in calls(controller, "/pin")] == ["vllm-3"]
    assert [c["instance_id"] for c in calls(controller, "/compress")] == ["vllm-3"]


def test_a_full_engine_offloads_its_coldest_content_not_the_served_one(make_gateway,
                                                                       controller) -> None:
    import time

    controller.layout = {"vllm-3": 4}
    gw = make_gateway({"cache_strategy": {"enable_eviction": True, "memory_threshold": 0.8}})
    gw.fleet.monitor.stats["vllm-3"] = EngineStats(running=1, waiting=0, kv_usage=0.95,
                                             at=time.monotonic())
    bodies = [b'{"model": "m", "prompt": [%d, 2, 3, 4]}' % i for i in (1, 2, 3)]
    results = []
    for body in bodies:
        routed = gw.route("vllm", body)
        results.append(gw.cache.manage(gw.job(routed), threading.Event()))
    assert results[0] == []  # nothing colder than the prompt being served
    assert [r.action for r in results[1]] == ["offload-move"]
    moves = calls(controller, "/move")
    assert [m["tokens"] for m in moves] == [[1, 2, 3, 4], [2, 2, 3, 4]]  # oldest first
    assert moves[0]["old_position"] == ["vllm-3", "LocalCPUBackend"]
    assert moves[0]["new_position"] == ["vllm-3", "LocalDiskBackend"]


def test_a_refused_action_never_opens_the_lookup_breaker(make_gateway, controller) -> None:
    import time

    controller.layout = {"vllm-3": 4}
    gw = make_gateway({"circuit_breaker": {"failure_threshold": 1},
                       "retry": {"max_attempts": 1},
                       "cache_strategy": {"enable_eviction": True, "memory_threshold": 0.8,
                                          "offload_action": "clear"}})
    gw.fleet.monitor.stats["vllm-3"] = EngineStats(kv_usage=0.95, at=time.monotonic())
    controller.script["/clear"] = [500] * 10
    for i in (1, 2, 3):
        routed = gw.route("vllm", b'{"model": "m", "prompt": [%d, 9]}' % i)
        assert routed.decision.reason == "cache"
        gw.cache.manage(gw.job(routed), threading.Event())
    assert gw.helpers.actions_breaker.snapshot()["state"] == "open"
    assert gw.helpers.lmcache_breaker.snapshot()["state"] == "closed"
