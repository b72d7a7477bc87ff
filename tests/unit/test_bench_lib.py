"""The routing benchmark's own parts: percentiles and their interval, goodput, the arrival
processes, deterministic workloads, and the client against a live simulated engine."""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib.client import Pool, Record, gaps, open_loop  # noqa: E402
from benchlib.stats import bootstrap_ci, pct, summarise  # noqa: E402
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


def test_goodput_counts_requests_within_the_objective_per_second() -> None:
    recs = [Record(0, 0, 0.0, ok=True, ttft_ms=t, prompt_tokens=100, cached_tokens=50)
            for t in (10, 20, 300, 400)] + [Record(1, 0, 0.0, error="status 502")]
    row = summarise(recs, window=2.0, slo_ms=100, busy={"a": 1.0, "b": 3.0})
    assert row["goodput_rps"] == 1.0 and row["failed"] == 1
    assert row["hit_ratio"] == 0.5 and row["imbalance"] == 1.5
    assert row["slo_met"] == 0.4


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
