"""Routing policies as plug-ins: the registry, the two policies from the field (loadaware,
cache_aware) on a real fleet view without a network, their knobs in the config, and the
gateway choosing them by ``policy:``."""

from __future__ import annotations

import json
import logging
import random
import time

import pytest

from kvgate import policies
from kvgate.config import ClusterConfig, ConfigError, Endpoint, from_mapping
from kvgate.fleet.cluster import Cluster
from kvgate.fleet.engine_metrics import EngineMonitor, EngineStats
from kvgate.fleet.health import HealthBook
from kvgate.fleet.view import FleetView
from kvgate.placement.layout import Placement
from kvgate.policies.base import BALANCER, CACHE, Policy, Prompt
from kvgate.policies.cache_aware import PIECE, ApproximateTree, CacheAwareOptions
from kvgate.policies.loadaware import LoadAwareOptions
from kvgate.policies.registry import register

from unit_support import calls, gateway_doc

EPS = tuple(Endpoint(f"e{i}", "127.0.0.1", 8000 + i) for i in (1, 2, 3))


def fleet(down: tuple[str, ...] = ()) -> FleetView:
    book = HealthBook()
    for ep_id in down:
        book.mark_down(ep_id, until_up=True)
    monitor = EngineMonitor(EPS, book, 0.0, 0.0)  # never started: figures are set by hand
    return FleetView(Cluster(ClusterConfig("c", EPS), book.is_healthy), monitor, 4)


def engine_reports(view: FleetView, ep_id: str, running: float, waiting: float) -> None:
    view.monitor.stats[ep_id] = EngineStats(running=running, waiting=waiting,
                                            at=time.monotonic())


def prompt(n_tokens: int = 1000, text: str = "") -> Prompt:
    return Prompt(text, tuple(range(n_tokens)), n_tokens)


# ------------------------------------------------------------ the registry


def test_every_policy_is_registered_by_name_with_its_own_state() -> None:
    assert set(policies.names()) >= {"kvgate", "longest_prefix", "round_robin", "loadaware",
                                     "cache_aware"}
    a, b = policies.create("cache_aware"), policies.create("cache_aware")
    assert isinstance(a, Policy) and a.name == "cache_aware"
    assert a is not b and a.tree is not b.tree  # one per cluster, nothing shared
    assert policies.spec("loadaware").options is LoadAwareOptions
    assert policies.spec("round_robin").options is None


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="twice"):
        register("loadaware")(type("Again", (Policy,), {"choose": lambda *a: None}))


def test_policies_that_need_no_lookup_say_so() -> None:
    need = {n: policies.spec(n).make(policies.spec(n).options() if policies.spec(n).options
                                     else None).needs_placements for n in policies.names()}
    assert need["round_robin"] is False and need["cache_aware"] is False
    assert need["kvgate"] and need["longest_prefix"] and need["loadaware"]


def test_round_robin_takes_turns_among_the_healthy() -> None:
    rr, view = policies.create("round_robin"), fleet(down=("e2",))
    got = [rr.choose(prompt(), [], view).endpoint.id for _ in range(4)]
    assert got == ["e1", "e3", "e1", "e3"]


# ------------------------------------------------------------ loadaware


def test_loadaware_follows_the_cache_when_load_is_even() -> None:
    d = policies.create("loadaware").choose(prompt(1000), [Placement("e2", "L", 800)], fleet())
    assert (d.endpoint.id, d.reason, d.matched_tokens) == ("e2", CACHE, 800)
    assert "hit 0.80" in d.detail


def test_loadaware_leaves_a_holder_whose_load_outweighs_its_hits() -> None:
    view = fleet()
    view.cluster.inflight.update({"e1": 10, "e2": 0, "e3": 5})
    # e1: 0.5 - 1.0 x 10/10 = -0.5; e2: 0 - 0 = 0; e3: 0 - 0.5 = -0.5
    d = policies.create("loadaware").choose(prompt(1000), [Placement("e1", "L", 500)], view)
    assert (d.endpoint.id, d.reason) == ("e2", BALANCER)
    # beta 0: hits alone
    d = policies.create("loadaware", LoadAwareOptions(beta=0.0)).choose(
        prompt(1000), [Placement("e1", "L", 500)], view)
    assert d.endpoint.id == "e1"


def test_loadaware_reads_engine_reported_load_beyond_its_own_in_flight() -> None:
    view = fleet()
    engine_reports(view, "e1", running=8, waiting=4)  # other gateways' traffic
    d = policies.create("loadaware").choose(prompt(1000), [Placement("e1", "L", 900)], view)
    assert d.endpoint.id != "e1"  # 0.9 - 1.0 < 0 for an idle peer


def test_loadaware_spreads_an_idle_fleet_when_nothing_is_cached() -> None:
    pol, view = policies.create("loadaware"), fleet()
    assert {pol.choose(prompt(), [], view).endpoint.id for _ in range(3)} == {"e1", "e2", "e3"}


def test_loadaware_skips_the_unhealthy_and_still_answers_when_none_is_healthy() -> None:
    pol = policies.create("loadaware")
    d = pol.choose(prompt(), [Placement("e1", "L", 900)], fleet(down=("e1",)))
    assert d.endpoint.id != "e1"
    d = pol.choose(prompt(), [], fleet(down=("e1", "e2", "e3")))
    assert d.reason == BALANCER and d.detail == "none healthy"


# ------------------------------------------------------------ kvgate's rule, nothing cached


def test_kvgate_spreads_an_idle_fleet_and_sends_a_new_prefix_to_the_fewest_in_flight() -> None:
    pol, view = policies.create("kvgate"), fleet()
    assert {pol.choose(prompt(), [], view).endpoint.id for _ in range(3)} == {"e1", "e2", "e3"}
    # below the batch slots (4 here) nobody has a queue, but e1 and e3 are busier: a new
    # prefix goes to e2 whoever's turn it is
    view.cluster.inflight.update({"e1": 3, "e2": 1, "e3": 2})
    got = [pol.choose(prompt(), [], view) for _ in range(3)]
    assert [(d.endpoint.id, d.reason) for d in got] == [("e2", BALANCER)] * 3
    # equal in flight: the rotation decides again
    view.cluster.inflight.update({"e1": 1, "e3": 1})
    assert {pol.choose(prompt(), [], view).endpoint.id for _ in range(3)} == {"e1", "e2", "e3"}


# ------------------------------------------------------------ cache_aware


def test_cache_aware_sends_a_repeat_where_its_text_went() -> None:
    pol, view = policies.create("cache_aware"), fleet()
    text = "You are a helpful assistant. " * 20
    first = pol.choose(prompt(text=text), [], view)
    assert first.reason == BALANCER  # nothing known: the smallest tree
    again = pol.choose(prompt(text=text + " And one more question?"), [], view)
    assert (again.endpoint.id, again.reason) == (first.endpoint.id, CACHE)
    assert "text prefix match" in again.detail


def test_cache_aware_spreads_new_texts_to_the_smallest_trees() -> None:
    pol, view = policies.create("cache_aware"), fleet()
    got = [pol.choose(prompt(text=f"{i} " + "x" * 400), [], view).endpoint.id
           for i in range(3)]
    assert sorted(got) == ["e1", "e2", "e3"]


def test_cache_aware_needs_more_than_the_threshold_in_common() -> None:
    pol, view = policies.create("cache_aware"), fleet()
    shared = "s" * (PIECE * 2)
    first = pol.choose(prompt(text=shared + "a" * (PIECE * 8)), [], view)
    # 2 of 10 pieces in common: 0.2 <= 0.3, so the smallest tree, not the match
    other = pol.choose(prompt(text=shared + "b" * (PIECE * 8)), [], view)
    assert other.endpoint.id != first.endpoint.id and other.reason == BALANCER


def test_cache_aware_balances_when_load_is_uneven_past_both_thresholds() -> None:
    pol, view = policies.create("cache_aware"), fleet()
    text = "t" * 1000
    holder = pol.choose(prompt(text=text), [], view).endpoint.id
    others = [ep.id for ep in EPS if ep.id != holder]
    view.cluster.inflight.update({holder: 100, others[0]: 30, others[1]: 10})
    d = pol.choose(prompt(text=text), [], view)
    assert (d.endpoint.id, d.reason) == (others[1], BALANCER)
    assert "imbalance" in d.detail
    view.cluster.inflight.update({holder: 60, others[0]: 30, others[1]: 10})  # 50 <= 64
    d = pol.choose(prompt(text=text), [], view)
    # balanced again: the text's most recent holder (the balance taught it the text too)
    assert (d.endpoint.id, d.reason) == (others[1], CACHE)


def test_cache_aware_never_matches_an_unhealthy_endpoint() -> None:
    pol = policies.create("cache_aware")
    text = "u" * 1000
    holder = pol.choose(prompt(text=text), [], fleet()).endpoint.id
    d = pol.choose(prompt(text=text), [], fleet(down=(holder,)))
    assert d.endpoint.id != holder


def test_the_approximate_tree_is_bounded_per_endpoint_oldest_first() -> None:
    tree = ApproximateTree(max_chars=PIECE * 10)
    old, new = "o" * (PIECE * 6), "n" * (PIECE * 6)
    tree.insert(old, "e1")
    tree.insert(new, "e1")
    assert tree.chars["e1"] <= PIECE * 10
    assert tree.match(new, lambda _: True) == (len(new), "e1")
    matched, _ = tree.match(old, lambda _: True)
    assert matched < len(old)  # its oldest pieces went first
    tree.insert(old, "e2")
    assert tree.match(old, lambda ep: ep == "e2") == (len(old), "e2")


# ------------------------------------------------------------ knobs in the config


def _doc(kv: dict) -> dict:
    return gateway_doc("http://127.0.0.1:1", "http://127.0.0.1:2", kv)


def test_knobs_live_under_the_policy_name_and_are_checked() -> None:
    cfg = from_mapping(_doc({"policy": "loadaware", "policies": {"loadaware": {"beta": 2}}}))
    assert cfg.kvcache.policies["loadaware"] == LoadAwareOptions(beta=2.0)
    assert cfg.kvcache.policies["cache_aware"] == CacheAwareOptions()  # defaults
    with pytest.raises(ConfigError, match=r"policies\.cache_aware\.cache_threshold"):
        from_mapping(_doc({"policies": {"cache_aware": {"cache_threshold": 1.5}}}))
    with pytest.raises(ConfigError, match=r"policies\.loadaware\.beta.*number"):
        from_mapping(_doc({"policies": {"loadaware": {"beta": "high"}}}))
    with pytest.raises(ConfigError, match="no settings"):
        from_mapping(_doc({"policies": {"round_robin": {"x": 1}}}))
    with pytest.raises(ConfigError, match="must be one of .*cache_aware"):
        from_mapping(_doc({"policy": "nope"}))


def test_an_unknown_policy_name_under_policies_is_warned_about(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kvgate"):
        from_mapping(_doc({"policies": {"lodaware": {"beta": 1}}}))
    assert "lodaware is no policy" in caplog.text


def test_the_kvgate_policy_still_reads_its_knobs_at_the_top_of_kvcache() -> None:
    cfg = from_mapping(_doc({"prefill_ms": 0.2, "queue_ms": 10}))
    model = cfg.kvcache.policies["kvgate"]
    assert (model.prefill_ms, model.load_ms, model.queue_ms) == (0.2, 0.007, 10.0)
    cfg = from_mapping(_doc({"prefill_ms": 0.2, "policies": {"kvgate": {"prefill_ms": 0.3}}}))
    assert cfg.kvcache.policies["kvgate"].prefill_ms == 0.3


# ------------------------------------------------------------ through the gateway


def _body(ids: list[int]) -> bytes:
    return json.dumps({"model": "m", "prompt": ids}).encode()


def test_the_gateway_routes_with_the_configured_policy(make_gateway, controller) -> None:
    ids = list(range(100, 400))
    controller.holdings = {"vllm-3": [ids]}
    gw = make_gateway({"policy": "loadaware"})
    routed = gw.route("vllm", _body(ids))
    assert (routed.decision.endpoint.id, routed.decision.reason) == ("vllm-3", CACHE)
    assert routed.decision.detail.startswith("score")


def test_a_policy_that_needs_no_lookup_makes_no_helper_calls(make_gateway, engine,
                                                             controller) -> None:
    gw = make_gateway({"policy": "cache_aware"})
    body = json.dumps({"model": "m", "prompt": "hello " * 300}).encode()
    first, second = gw.route("vllm", body), gw.route("vllm", body)
    assert second.decision.endpoint.id == first.decision.endpoint.id
    assert second.decision.reason == CACHE
    assert calls(controller, "/lookup") == [] and engine.raw_tokenize == []


def test_a_queue_read_before_requests_finished_is_discounted_by_them() -> None:
    """The engine's waiting queue is read every metrics_interval; what the gateway saw
    finish there since must not be counted as still waiting (it herded traffic away from
    drained engines)."""
    view = fleet()
    view.monitor.full_slots["e1"] = 3.0
    view.monitor.stats["e1"] = EngineStats(running=3, waiting=2, at=time.monotonic(), done=5)
    view.cluster.finished["e1"] = 5
    assert view.ahead()["e1"] == 3.0  # two queued, then a slot to free: three completions
    view.cluster.finished["e1"] = 6
    assert view.ahead()["e1"] == 2.0
    view.cluster.finished["e1"] = 9
    assert view.ahead()["e1"] == 0.0
    view.cluster.inflight["e1"] = 5  # its own count beyond the slots still queues
    assert view.ahead()["e1"] == 3.0
    view.cluster.inflight["e1"] = 3  # every slot taken, none queued: it waits for one
    assert view.ahead()["e1"] == 1.0
    view.cluster.inflight["e1"] = 2
    assert view.ahead()["e1"] == 0.0


def test_the_queue_view_follows_the_monitors_rules_for_slots_and_stale_figures() -> None:
    """``FleetView.ahead`` has ``batch_slots`` and ``fresh`` inline (it runs per endpoint
    per request): the same queue as those rules give, over random states."""
    rng = random.Random(3)
    for _ in range(300):
        view = fleet()
        mon, cluster = view.monitor, view.cluster
        for ep in EPS:
            cluster.inflight[ep.id] = rng.randint(0, 12)
            if rng.random() < 0.5:
                cluster.finished[ep.id] = rng.randint(0, 5)
            if rng.random() < 0.5:
                mon.slots[ep.id] = float(rng.randint(0, 8))
            if rng.random() < 0.3:
                mon.full_slots[ep.id] = float(rng.randint(1, 8))
            if rng.random() < 0.7:
                age = rng.choice((0.0, 0.5, 5.0))  # 5 s: older than max_age, ignored
                mon.stats[ep.id] = EngineStats(running=2, waiting=float(rng.randint(0, 9)),
                                               at=time.monotonic() - age,
                                               done=rng.randint(0, 3))
        got = view.ahead()
        for ep in EPS:
            st = mon.fresh(ep.id)
            waiting = 0.0 if st is None else st.waiting - (
                cluster.finished.get(ep.id, 0) - st.done)
            want = max(cluster.inflight[ep.id] - mon.batch_slots(ep.id, 4.0) + 1,
                       waiting + 1 if waiting > 0 else 0.0, 0.0)
            assert got[ep.id] == want, (ep.id, got, want)
