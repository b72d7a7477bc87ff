"""The routing model: predicted TTFT from cached tokens and load; the local prefix index."""

from __future__ import annotations

import random

import pytest

from kvgate.config import Endpoint
from kvgate.fleet.engine_metrics import parse_metrics
from kvgate.placement.layout import Placement
from kvgate.placement.prefix_index import PrefixIndex
from kvgate.policies import predicted_ttft as routing

EPS = [Endpoint(f"e{i}", "127.0.0.1", 8000 + i) for i in (1, 2, 3)]
MODEL = routing.CostModel(prefill_ms=0.1, load_ms=0.01, queue_ms=50.0)


def always(_: str) -> bool:
    return True


def test_cached_prefix_wins_when_load_is_even() -> None:
    pick = routing.cheapest(2000, [Placement("e2", "cpu", 1500)], EPS, always, {}, MODEL)
    assert pick is not None
    ep, matched, cost = pick
    assert (ep.id, matched) == ("e2", 1500)
    assert cost == MODEL.ttft(2000, 1500, 0)


def test_a_queue_outweighs_a_small_cache_advantage() -> None:
    # 200 cached tokens save 18 ms; three requests queued ahead cost 150 ms
    pick = routing.cheapest(1000, [Placement("e1", "cpu", 200)], EPS, always,
                            {"e1": 3, "e2": 0, "e3": 1}, MODEL)
    assert pick is not None and pick[0].id == "e2" and pick[1] == 0


def test_a_long_cached_prefix_is_worth_a_short_queue() -> None:
    # 4000 cached tokens save 360 ms; one request ahead costs 50 ms
    pick = routing.cheapest(5000, [Placement("e3", "cpu", 4000)], EPS, always,
                            {"e3": 1}, MODEL)
    assert pick is not None and pick[0].id == "e3"


def test_unhealthy_endpoints_are_never_chosen() -> None:
    pick = routing.cheapest(1000, [Placement("e1", "cpu", 1000)], EPS,
                            lambda ep: ep != "e1", {}, MODEL)
    assert pick is not None and pick[0].id != "e1"
    assert routing.cheapest(10, [], EPS, lambda _: False, {}, MODEL) is None


def test_ties_go_to_fewer_ahead_then_config_order() -> None:
    pick = routing.cheapest(100, [], EPS, always, {"e1": 0.0, "e2": 0.0, "e3": 0.0}, MODEL)
    assert pick is not None and pick[0].id == "e1"
    pl = [Placement("e3", "cpu", 50), Placement("e2", "cpu", 50)]
    pick = routing.cheapest(100, pl, EPS, always, {"e2": 0, "e3": 0}, MODEL)
    assert pick is not None and pick[0].id == "e2"


def test_metrics_parse_sums_labels_and_accepts_the_older_kv_name() -> None:
    text = b"""# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 2
vllm:num_requests_waiting{model_name="b"} 3
vllm:num_requests_running{model_name="a"} 7.0
vllm:gpu_cache_usage_perc{model_name="a"} 0.5
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="a"} 4
"""
    st = parse_metrics(text)
    assert (st.waiting, st.running, st.kv_usage) == (5.0, 7.0, 0.5)
    assert parse_metrics(b"garbage\x00").waiting == 0.0


def test_prefix_index_follows_a_growing_conversation() -> None:
    idx = PrefixIndex(capacity=1000)
    turn1 = "system: " + "rules " * 200 + "user: hi"
    idx.record(turn1, "e2")
    turn2 = turn1 + " assistant: hello user: more " + "x" * 300
    found = idx.best(turn2)
    assert found is not None and found[0] == "e2"
    assert found[1] >= 1024
    assert idx.best("something else entirely " * 40) is None


def test_prefix_index_is_bounded() -> None:
    idx = PrefixIndex(capacity=10)
    for i in range(50):
        idx.record(f"prompt {i} " + "y" * 2000, f"e{i % 3}")
    assert len(idx) <= 10


def test_a_second_copy_of_a_prefix_is_charged_for_what_it_evicts() -> None:
    held = [Placement("e1", "cpu", 1500)]
    ahead = {"e1": 3.0, "e2": 0.0, "e3": 0.0}
    myopic = routing.CostModel(replicate=0.0)
    # queueing 3 deep (120 ms) costs more than prefilling 1500 tokens elsewhere (105 ms)
    assert routing.cheapest(1500, held, EPS, always, ahead, myopic)[0].id == "e2"
    # but that copy will evict something a later request needed: the holder keeps it
    assert routing.cheapest(1500, held, EPS, always, ahead, routing.CostModel())[0].id == "e1"
    # a queue deep enough still spreads a hot prefix
    deep = {"e1": 9.0, "e2": 0.0, "e3": 0.0}
    assert routing.cheapest(1500, held, EPS, always, deep, routing.CostModel())[0].id == "e2"
    # nothing held anywhere: no copy, no charge
    assert routing.CostModel().cost(1500, 0, 0.0, 0) == routing.CostModel().ttft(1500, 0, 0.0)


def test_the_ranking_prices_every_endpoint_as_the_cost_model_does() -> None:
    """``ranked`` has the model's sums inline (it runs per endpoint per request): the
    same figures as ``CostModel.cost`` and ``ttft`` for any holdings, queues and knobs."""
    rng = random.Random(7)
    for _ in range(500):
        model = routing.CostModel(prefill_ms=rng.choice((0.07, 0.1, 0.0)),
                                  load_ms=rng.choice((0.007, 0.0, 0.02)),
                                  queue_ms=rng.choice((40.0, 0.0, 7.5)),
                                  replicate=rng.choice((1.0, 0.0, 0.5, 2.0)))
        n = rng.randint(0, 3000)
        held = [Placement(ep.id, "cpu", rng.randint(0, 4000)) for ep in EPS
                if rng.random() < 0.5]
        ahead = {ep.id: rng.choice((0.0, 1.0, 2.5, 9.0)) for ep in EPS}
        up = {ep.id for ep in EPS if rng.random() < 0.8}
        top = max((p.tokens for p in held if p.instance_id in up), default=0)
        for ep, matched, cost in routing.ranked(n, held, EPS, up.__contains__, ahead, model):
            assert cost == pytest.approx(model.cost(n, matched, ahead[ep.id], top))
        best = routing._ranked(n, held, EPS, up.__contains__, ahead, model, None)
        for _, ep, matched, _, ttft in best:
            assert ttft == pytest.approx(model.ttft(n, matched, ahead[ep.id]))


def test_a_prompt_noted_again_within_its_window_is_not_hashed_again(monkeypatch) -> None:
    from kvgate.placement import prefix_index as module
    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    idx = PrefixIndex(capacity=1000)
    text = "system: " + "rules " * 200
    assert idx.note("k", text, "e1") is True
    assert idx.note("k", text, "e2") is False  # a repeat: wherever it went, not re-hashed
    assert idx.best(text)[0] == "e1"
    now[0] += module.RECORDED_FOR + 0.1
    assert idx.note("k", text, "e2") is True
    assert idx.best(text)[0] == "e2"
