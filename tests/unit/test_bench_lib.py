"""The routing benchmark's own parts: percentiles and their interval, goodput, the arrival
processes, deterministic workloads, and the client against a live simulated engine."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import sys
from itertools import islice
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib import floor  # noqa: E402
from benchlib.client import Pool, Record, gaps, open_loop  # noqa: E402
from benchlib.stats import bootstrap_ci, bootstrap_sum_ci, pct, summarise  # noqa: E402
from benchlib.workloads import WORKLOADS  # noqa: E402

from kvgate.sim.engine import EngineParams, SimEngine  # noqa: E402


def test_nearest_rank_percentiles() -> None:
    values = list(range(1, 101))
    assert (pct(values, 50), pct(values, 99), pct(values, 100)) == (50, 99, 100)
    assert pct([7.0], 99) == 7.0


def test_the_p99_interval_brackets_the_estimate_and_narrows_with_more_requests() -> None:
    rng = random.Random(1)
    few = [rng.expovariate(1 / 50) for _ in range(200)]
    many = [rng.expovariate(1 / 50) for _ in range(5000)]
    lo, hi = bootstrap_ci(few, 99)
    assert lo <= pct(sorted(few), 99) <= hi
    lo2, hi2 = bootstrap_ci(many, 99)
    assert hi2 - lo2 < hi - lo


def test_hit_ratio_and_goodput_intervals_bracket_the_run_and_narrow_with_requests() -> None:
    rng = random.Random(2)
    for n in (100, 2000):
        prompt = [1000.0] * n
        cached = [1000.0 if rng.random() < 0.8 else 0.0 for _ in range(n)]
        lo, hi = bootstrap_sum_ci(cached, prompt)
        assert lo <= sum(cached) / sum(prompt) <= hi and lo > 0.6 and hi < 0.95
        met = [1.0 if rng.random() < 0.5 else 0.0 for _ in range(n)]
        glo, ghi = bootstrap_sum_ci(met, 10.0)
        assert glo <= sum(met) / 10.0 <= ghi
        if n == 100:
            wide, gwide = hi - lo, ghi / n - glo / n
    assert hi - lo < wide and ghi / n - glo / n < gwide
    assert all(map(math.isnan, bootstrap_sum_ci([1.0], [2.0])))


def test_a_target_missed_inside_one_runs_noise_says_so_and_stays_not_met() -> None:
    import bench

    def run(router: str, hit: float, hit_ci: list[float], good: float,
            good_ci: list[float]) -> dict:
        return {"workload": "w", "load": 0.8, "router": router, "hit_ratio": hit,
                "goodput_rps": good, "client_ttft_ms": {"p50": 10.0, "p99": 300.0,
                                                        "p99_ci95": [250.0, 350.0]},
                "hit_ratio_ci95": hit_ci, "goodput_ci95": good_ci}

    verdicts = bench.targets([run("kvgate", 0.80, [0.78, 0.82], 18.0, [17.5, 18.5]),
                              run("sglang:cache_aware", 0.83, [0.81, 0.85], 21.0,
                                  [20.0, 22.0])])
    hit, p99, good = verdicts
    # the hit ratio on one stream is steadier than its unpaired intervals: no label
    assert hit == ("[NOT met] w 80%: hit ratio 0.800 >= best peer 0.830 "
                   "(sglang:cache_aware) - 0.005")
    assert p99.startswith("[NOT met] w 80%: client TTFT p99 300.0 ms <= 0.8 x best peer")
    assert p99.endswith("; within one run's noise: 95% intervals kvgate 250.0-350.0, "
                        "target 200.0-280.0")
    assert good.startswith("[NOT met]") and "noise" not in good  # 18.5 < 20.0
    near = bench.targets([run("kvgate", 0.80, [0.78, 0.82], 19.0, [18.0, 20.5]),
                          run("sglang:cache_aware", 0.83, [0.81, 0.85], 21.0, [20.0, 22.0])])
    assert near[2].endswith("95% intervals kvgate 18.0-20.5, target 20.0-22.0")
    # with repeats, their spread decides, not one run's interval
    twice = bench.targets([run("kvgate", 0.80, [0.78, 0.82], 18.0, [17.5, 18.5])] * 2
                          + [run("sglang:cache_aware", 0.83, [0.81, 0.85], 21.0,
                                 [20.0, 22.0])] * 2)
    assert "noise" not in twice[1]


def test_goodput_counts_requests_within_the_objective_per_second() -> None:
    recs = [Record(0, 0, 0.0, ok=True, ttft_ms=t, prompt_tokens=100, cached_tokens=50)
            for t in (10, 20, 300, 400)] + [Record(1, 0, 0.0, error="status 502")]
    row = summarise(recs, window=2.0, slo_ms=100, busy={"a": 1.0, "b": 3.0})
    assert row["goodput_rps"] == 1.0 and row["failed"] == 1
    assert row["hit_ratio"] == 0.5 and row["imbalance"] == 1.5
    assert row["slo_met"] == 0.4
    assert row["hit_ratio_ci95"] == [0.5, 0.5]  # every request half cached
    lo, hi = row["goodput_ci95"]
    assert 0.0 <= lo <= 1.0 <= hi <= 2.5  # 0-5 of 5 within the objective, over 2 s


def test_arrivals_keep_the_rate_and_bursty_ones_clump() -> None:
    poisson = list(islice(gaps(20.0, "poisson", random.Random(1)), 20000))
    bursty = list(islice(gaps(20.0, "bursty", random.Random(1)), 20000))
    for g in (poisson, bursty):
        assert abs(statistics.mean(g) - 0.05) < 0.005
    cv = statistics.pstdev(bursty) / statistics.mean(bursty)
    assert 1.7 < cv < 2.3  # shape 0.25: coefficient of variation 2 (Poisson: 1)


def test_workloads_are_deterministic_and_sized() -> None:
    for name, make in WORKLOADS.items():
        a, b = make(random.Random("s"), 60), make(random.Random("s"), 60)
        assert 60 <= a.requests <= 64, name
        assert [s[0]({}) for s in a.sessions[:3]] == [s[0]({}) for s in b.sessions[:3]], name
        assert a.slots > 0 and a.slo_ms > 0


def test_the_client_times_a_stream_and_reads_the_engine_and_usage() -> None:
    engine = SimEngine("e1", EngineParams(time_scale=0.01, max_output=4))
    port = engine.start()
    try:
        wl = WORKLOADS["multi_turn_chat"](random.Random(2), 8)
        recs, window = asyncio.run(open_loop(f"http://127.0.0.1:{port}", wl, 20.0, 0.5,
                                             "poisson", random.Random(3), 4))
        done = [r for r in recs if r.ok]
        assert done and all(r.engine == "e1" for r in done)
        assert all(0 < r.ttft_ms <= r.e2e_ms for r in done)
        turns = [r for r in done if r.step > 0]
        assert turns and all(r.cached_tokens > 0 for r in turns)  # history was cached
        assert window >= 0.5
        assert asyncio.run(Pool(f"http://127.0.0.1:{port}").stream(
            "/nope", {"model": "m", "prompt": "x"}, rec := Record(0, 0, 0.0), 0.0)) == ""
        assert rec.error == "status 404"
    finally:
        engine.stop()


def test_a_warm_up_is_played_but_not_measured() -> None:
    """Requests sent in the warm-up reach the engine and are left out of what is returned;
    the rest are timed from the warm-up's end."""
    engine = SimEngine("e1", EngineParams(time_scale=0.01, max_output=4))
    port = engine.start()
    try:
        wl = WORKLOADS["unique"](random.Random(2), 60)
        recs, window = asyncio.run(open_loop(f"http://127.0.0.1:{port}", wl, 40.0, 0.4,
                                             "poisson", random.Random(3), 4, warmup=0.4))
        served = engine.ttft_n
        assert recs and all(r.ok and 0.0 <= r.start < 0.4 for r in recs)
        assert served > len(recs)  # the warm-up's went to the engine too
        assert 0.4 <= window < 0.8
    finally:
        engine.stop()


def test_routers_by_name_and_kvgate_with_knobs_set() -> None:
    from benchlib.routers import ROUTERS, find_router, kvgate_config

    assert find_router("vllm-router:cache_aware") is ROUTERS["vllm-router:cache_aware"]
    r = find_router("kvgate@replicate=2@queue_ms=60")
    assert (r.kind, r.setting, r.peer) == ("kvgate", "kvgate", False)
    assert r.knobs == (("replicate", 2.0), ("queue_ms", 60.0))

    class Cluster:
        def config(self) -> dict:
            return {"kvcache": {"lookup_routing_timeout": "50ms"}}

    kv = kvgate_config(Cluster(), r.setting, r.knobs)["kvcache"]  # type: ignore[arg-type]
    assert kv["policies"] == {"kvgate": {"replicate": 2.0, "queue_ms": 60.0}}
    # a number of the gateway's own goes to kvcache, checked as its config would be
    r = find_router("kvgate@min_batch_slots=1@replicate=3")
    kv = kvgate_config(Cluster(), r.setting, r.knobs)["kvcache"]  # type: ignore[arg-type]
    assert kv["min_batch_slots"] == 1 and isinstance(kv["min_batch_slots"], int)
    assert kv["policies"] == {"kvgate": {"replicate": 3.0}}
    for bad in ("kvgate@nope=1", "kvgate@replicate=lots", "kvgate@replicate=-1", "kvgate@",
                "sglang@replicate=2", "nobody", "kvgate@min_batch_slots=1.5",
                "kvgate@metrics_interval=-1", "kvgate@debug_headers=1"):
        with pytest.raises(KeyError):
            find_router(bad)


def test_verdicts_weigh_each_routers_mean_over_repeats() -> None:
    """kvgate's runs against each peer's mean, not kvgate's first run against the best
    run any peer had (which a lucky repeat of a peer would win)."""
    import bench

    def run(router: str, hit: float, good: float, p99: float) -> dict:
        return {"workload": "w", "load": 0.8, "router": router, "hit_ratio": hit,
                "goodput_rps": good, "client_ttft_ms": {"p50": 10.0, "p99": p99}}

    rows = [run("kvgate", 0.60, 20.0, 300.0), run("kvgate", 0.70, 24.0, 300.0),
            run("sglang:cache_aware", 0.66, 23.0, 350.0),
            run("sglang:cache_aware", 0.62, 19.0, 350.0)]
    verdicts = bench.targets(rows)
    assert "[met] w 80%: hit ratio 0.650 >= best peer 0.640" in verdicts[0]
    assert verdicts[2].startswith("[met] w 80%: goodput 22.0 >= best peer 21.0")
    assert verdicts[1].startswith("[NOT met] w 80%: client TTFT p99 300.0 ms <= 0.8 x best "
                                  "peer 350.0")


def test_a_prompts_new_tokens_are_those_past_its_longest_prefix_sent_before() -> None:
    prompts = [(1, 2, 3, 4), (1, 2, 3, 9, 9), (5, 6), (1, 2, 3, 4, 7), (5, 6), (2,)]
    assert floor.new_tokens(prompts) == [4, 2, 2, 1, 0, 1]
    rng = random.Random(5)  # against every pair, on prompts that share prefixes
    stems = [tuple(rng.randrange(4) for _ in range(rng.randrange(1, 30))) for _ in range(8)]
    prompts = [rng.choice(stems)[:rng.randrange(31)] + tuple(rng.randrange(4) for _ in
               range(rng.randrange(6))) for _ in range(200)]
    want = [len(p) - max((floor.common_prefix(p, q) for q in prompts[:i]), default=0)
            for i, p in enumerate(prompts)]
    assert floor.new_tokens(prompts) == want


def test_the_floor_takes_requests_in_sending_order_on_the_fastest_engine() -> None:
    """Records arrive in completion order; the floor follows their send times. Failed
    requests count against the goodput ceiling's window but not in the percentiles."""
    def rec(start: float, words: int, ok: bool = True) -> Record:
        return Record(0, 0, start, ok=ok, body={"prompt": " ".join(["w"] * words)})

    def tokens(body: dict) -> list[int]:
        return [1] * len(body["prompt"].split())

    recs = [rec(2.0, 150), rec(1.0, 100), rec(3.0, 100, ok=False)]
    got = floor.floors_ms(recs, tokens, prefill_ms=0.1, time_scale=2.0)
    assert got == [pytest.approx(10.0), pytest.approx(20.0), 0.0]
    fig = floor.figures(recs, window=2.0, slo_ms=15.0, tokenize=tokens,
                        engines=[(0.2, 2.0), (0.1, 2.0)])
    assert fig["floor_ttft_ms"] == {"p50": 10.0, "p99": 20.0}
    assert fig["goodput_ceiling_rps"] == 1.0  # the 50-token one and the repeat


def test_a_target_past_the_floor_is_called_out_of_reach() -> None:
    import bench

    def run(router: str, p99: float, good: float, load: float = 0.8) -> dict:
        return {"workload": "w", "load": load, "router": router, "hit_ratio": 0.5,
                "goodput_rps": good, "client_ttft_ms": {"p50": 10.0, "p99": p99},
                "floor_ttft_ms": {"p50": 5.0, "p99": 190.0}, "goodput_ceiling_rps": 21.0}

    verdicts = bench.targets([run("kvgate", 200.0, 20.0), run("sglang:cache_aware", 220.0,
                                                              20.0),
                              run("kvgate", 200.0, 20.0, 0.95),
                              run("sglang:cache_aware", 220.0, 20.0, 0.95)])
    assert verdicts[1] == ("[out of reach] w 80%: client TTFT p99 200.0 ms <= 0.8 x best peer "
                           "220.0 (sglang:cache_aware): the floor's p99 is 190.0 ms")
    assert verdicts[3].startswith("[out of reach] w 95%: goodput 20.0 >= 1.1 x best peer")
    assert verdicts[3].endswith(": the ceiling is 21.0")
    near = bench.targets([run("kvgate", 210.0, 20.0), run("sglang:cache_aware", 250.0, 20.0)])
    assert near[1].startswith("[NOT met]")  # 0.8 x 250 = 200 > the floor: within reach
    assert near[1].endswith("(sglang:cache_aware)")


def test_charts_plot_the_mean_of_the_repeats_per_load() -> None:
    import bench

    rows = [{"load": 0.8, "v": 10.0}, {"load": 0.5, "v": 4.0}, {"load": 0.8, "v": 20.0}]
    assert bench.per_load(rows, lambda r: r["v"]) == [(0.5, 4.0), (0.8, 15.0)]


def test_charts_are_written_with_the_hit_ratio_against_p99(tmp_path: Path) -> None:
    import bench

    rows = [{"workload": w, "load": load, "router": r, "repeat": 0, "hit_ratio": h,
             "goodput_rps": 10.0, "client_ttft_ms": {"p50": 10.0, "p99": p}}
            for w in ("rag", "unique") for load in (0.5, 0.8)
            for r, h, p in (("kvgate", 0.8, 200.0), ("kvgate@replicate=2", 0.82, 260.0),
                            ("vllm-router:cache_aware", 0.83, 900.0))]
    bench.charts(rows, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "ttft_p99_vs_load.png", "goodput_vs_load.png", "hit_vs_p99.png"}


def test_scrape_reads_decisions_and_helper_means_from_prometheus_text() -> None:
    """What the bench reads from kvgate's admin port, from text prometheus-client wrote."""
    from benchlib.routers import parse_scrape
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    reg = CollectorRegistry()
    decisions = Counter("kvgate_routing_decisions", "", ["reason"], registry=reg)
    decisions.labels("cache").inc(3)
    decisions.labels("balancer").inc()
    lookup = Histogram("kvgate_lookup_seconds", "", registry=reg)
    for s in (0.001, 0.002, 0.003):
        lookup.observe(s)
    Histogram("kvgate_tokenize_seconds", "", registry=reg)  # never called: no mean
    got = parse_scrape(generate_latest(reg).decode())
    assert got["routes"] == {"cache": 3.0, "balancer": 1.0}
    assert got["helper_ms"] == {"lookup": 2.0}
    assert parse_scrape("") == {}


def test_the_pooled_ideal_queues_for_the_first_slot_of_the_cluster_to_free() -> None:
    recs = [Record(session=i, step=0, start=s, ok=True) for i, s in
            enumerate((0.0, 0.05, 0.0, 0.0))]  # not in sending order
    floors = [10.0, 20.0, 10.0, 10.0]
    # two slots, each held 10 ms of prefill + 90 ms of decode: the third and fourth wait
    assert floor.pooled_ms(recs, floors, 2, 90.0) == [10.0, 70.0, 10.0, 110.0]
    # enough slots: nobody queues, the pool is the floor
    assert floor.pooled_ms(recs, floors, 4, 90.0) == floors
    fig = floor.figures(recs, window=1.0, slo_ms=50.0, tokenize=lambda body: [],
                        engines=[(0.1, 1.0)], pool=(2, 90.0))
    # floors of 0 (empty prompts): the third sent at 0 waits 90 ms, over the 50 ms objective;
    # the one sent at 50 ms waits 40
    assert fig["pooled_goodput_rps"] == 3.0


def test_a_target_past_the_pooled_ideal_says_so() -> None:
    import bench

    def run(router: str, p99: float, pooled: float) -> dict:
        return {"workload": "w", "load": 0.8, "router": router, "hit_ratio": 0.5,
                "goodput_rps": 20.0, "client_ttft_ms": {"p50": 10.0, "p99": p99},
                "floor_ttft_ms": {"p50": 5.0, "p99": 100.0}, "goodput_ceiling_rps": 21.0,
                "pooled_ttft_ms": {"p50": 6.0, "p99": pooled}, "pooled_goodput_rps": 21.0}

    past = bench.targets([run("kvgate", 200.0, 180.0), run("sglang:cache_aware", 220.0, 0)])
    assert past[1] == ("[NOT met, past the pooled ideal] w 80%: client TTFT p99 200.0 ms <= "
                       "0.8 x best peer 220.0 (sglang:cache_aware): its p99 is 180.0 ms")
    within = bench.targets([run("kvgate", 200.0, 150.0), run("sglang:cache_aware", 220.0, 0)])
    assert within[1].startswith("[NOT met] w 80%")
