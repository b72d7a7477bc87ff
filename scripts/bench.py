"""kvgate's routing benchmark: open-loop load on a simulated cluster, kvgate against the
open routers, on the same cluster and the same request stream.

For each workload (``benchlib/workloads.py``) it starts the cluster its workload asks for
(one process per engine and the twin controller), measures its capacity (requests/s with
every batch slot busy and no router: each request to the next engine in turn), then for
each offered load (a fraction of that capacity) and each router plays the same stream
open-loop: sessions arrive by a Poisson (or bursty) process, streamed requests, the
cluster reset to empty before every run. Routers alternate their order from one load to
the next, so that a drifting machine favours nobody.

Per run: client-side TTFT (wall clock, the router's own time included) p50/p90/p99 with
a 95% bootstrap interval on p99; the engines' model TTFT; goodput (requests meeting the
workload's TTFT objective, per second of arrivals); prefix-hit ratio from the engines'
``cached_tokens``; imbalance (max over mean of the engines' busy time); failures.

Writes DIR/results.json (schema in docs/bench/README.md), DIR/results.md and charts
(TTFT p99 and goodput against offered load, a panel per workload, a line per router);
with --dump-requests every run's requests too (DIR/requests/, for bench_hindsight.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import dump, floor, workloads  # noqa: E402
from benchlib.client import (  # noqa: E402
    MODEL,  # noqa: E402
    closed_loop,
    open_loop,
)
from benchlib.cluster import ROOT, SimCluster, engine_params  # noqa: E402
from benchlib.real_cluster import RealCluster  # noqa: E402
from benchlib.routers import ROUTERS, Router, find_router, start  # noqa: E402
from benchlib.stats import summarise  # noqa: E402
from benchlib.workloads import WORKLOADS, Workload  # noqa: E402

from kvgate.sim.stub import tokenize_request  # noqa: E402  (benchlib.routers: on the path)

SCHEMA = "kvgate-bench/3"
# sglang:power_of_two is left out of the default sweep (--routers adds it): it was the best
# peer in no cell of the 2026-12-01 sweep (docs/benchmarks.md), so it decides no target,
# and its runs took a sixth of the sweep, which now fits the 20 minutes it may take
DEFAULT_ROUTERS = ("round_robin", "kvgate", "vllm-router:cache_aware",
                   "vllm-router:power_of_two", "sglang:cache_aware")
QUICK_ROUTERS = ("round_robin", "kvgate", "vllm-router:cache_aware", "sglang:cache_aware")
# what fits two tiny CPU engines (4,096 tokens each, no engine to lose, one kind of engine)
REAL_WORKLOADS = ("multi_turn_chat", "hot_prefix", "rag", "unique", "mixed")
LOST_ENGINE = 1  # engine_lost kills vllm-2


def fault_for(wl: Workload, cluster: SimCluster) -> Callable[[float], Awaitable[None]] | None:
    if wl.fault != "lose_engine":
        return None

    async def lose_and_restore(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(seconds / 3)
        await loop.run_in_executor(None, cluster.lose, LOST_ENGINE)
        await asyncio.sleep(seconds / 3)
        await loop.run_in_executor(None, cluster.restore, LOST_ENGINE)

    return lose_and_restore


def make(name: str, seed: str, n: int, speed: float) -> Workload:
    wl = WORKLOADS[name](random.Random(seed), n)
    wl.params["time_scale"] /= speed
    for extra in wl.per_engine.values():
        if "time_scale" in extra:
            extra["time_scale"] /= speed
    wl.slo_ms /= speed
    return wl


def play_cell(wl_name: str, load: float, capacity: float, routers: list[Router],
              cluster: SimCluster | RealCluster, args: argparse.Namespace, log_dir: Path,
              bar: tqdm) -> list[dict[str, Any]]:
    """Every router on one (workload, load): the same stream, each on a reset cluster."""
    rate = load * capacity
    rows = []
    for rep in range(args.repeats):
        seed = f"{args.seed}:{wl_name}:{load}:{rep}"
        n = math.ceil(rate * (args.warmup + args.seconds) * 1.5) + 8
        wl = make(wl_name, seed, n, args.speed)
        if args.slo_ms:
            wl.slo_ms = args.slo_ms
        for router in routers:
            cluster.reset()
            t0 = time.monotonic()
            with start(router, cluster, log_dir) as running:
                records, window = asyncio.run(open_loop(
                    running.url, wl, rate, args.seconds, args.arrival, random.Random(seed),
                    wl.params["max_output"], fault_for(wl, cluster), model=args.model,
                    warmup=args.warmup))
                scraped = running.scrape()
            row = summarise(records, window, wl.slo_ms, cluster.busy_seconds())
            if isinstance(cluster, SimCluster) and not any(e.tokenizer for e in cluster.params):
                # its timing model and tokenizer are known here: the floor, and the
                # pooled ideal (every slot in one queue, a request holds one for its
                # decode steps after the first token, which streams at once)
                fast = min(cluster.params, key=lambda e: e.decode_ms * e.time_scale)
                steps = min(wl.params["max_output"], fast.max_output) - 1
                row.update(floor.figures(
                    records, window, wl.slo_ms, tokenize_request,
                    [(e.prefill_ms, e.time_scale) for e in cluster.params],
                    pool=(sum(e.batch_slots for e in cluster.params),
                          steps * fast.decode_ms * fast.time_scale)))
                if args.dump_requests:  # the same timing model and tokenizer
                    dump.write(args.out / "requests" / dump.name(wl_name, load, router.name,
                                                                 rep),
                               dump_meta(wl, load, router.name, rep, cluster), records,
                               tokenize_request)
            row.update(scraped)
            row.update({"workload": wl_name, "load": load, "router": router.name,
                        "offered_rps": round(rate, 2), "repeat": rep,
                        "wall_s": round(time.monotonic() - t0, 1)})
            rows.append(row)
            bar.set_postfix_str(f"{wl_name} {load:.0%} {router.name}")
            bar.update(1)
        routers = routers[::-1]  # alternate the order
    return rows


def dump_meta(wl: Workload, load: float, router: str, rep: int,
              cluster: SimCluster) -> dict[str, Any]:
    """What a request dump says of its run (``benchlib/dump.py``)."""
    steps = wl.params["max_output"] - 1  # decode steps after the first token
    engines = [{"slots": e.batch_slots, "prefill_ms": e.prefill_ms * e.time_scale,
                "hold_ms": min(steps, e.max_output - 1) * e.decode_ms * e.time_scale}
               for e in cluster.params]
    return {"workload": wl.name, "load": load, "router": router, "repeat": rep,
            "fault": wl.fault, "slo_ms": wl.slo_ms, "engines": engines}


def run_workload(name: str, loads: list[float], routers: list[Router],
                 args: argparse.Namespace, log_dir: Path, bar: tqdm,
                 real: RealCluster | None = None) -> tuple[float, list[dict[str, Any]]]:
    """Capacity, then every (load, router) cell, on the workload's own simulated cluster
    or on the real one."""
    probe = make(name, f"{args.seed}:{name}:capacity", 4000, args.speed)
    cluster: SimCluster | RealCluster
    if real is not None:
        cluster = real
    else:
        cluster = SimCluster(engine_params(probe.params, probe.per_engine, probe.engines),
                             log_dir)
        cluster.start()
    try:
        cluster.reset()
        slots = probe.slots if real is None else 2 * len(real.urls)
        capacity = asyncio.run(closed_loop(cluster.urls, probe, 2 * slots,
                                           args.capacity_seconds, probe.params["max_output"],
                                           model=args.model))
        rows = []
        for i, load in enumerate(loads):
            order = routers if i % 2 == 0 else routers[::-1]
            rows += play_cell(name, load, capacity, order, cluster, args, log_dir, bar)
        return capacity, rows
    finally:
        if real is None:
            cluster.stop()


# ---------------------------------------------------------------- reporting


def best_peer(rows: list[dict], key: Any, lower: bool) -> tuple[str, float] | None:
    peers = [(r["router"], key(r)) for r in rows if find_router(r["router"]).peer]
    if not peers:
        return None
    return (min if lower else max)(peers, key=lambda p: p[1])


def mean_per_router(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per router: with ``--repeats`` the mean of its runs (they played the same
    streams), so a verdict weighs kvgate's runs against each peer's, not one run of
    kvgate against the best run any peer had."""
    by_router: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_router.setdefault(r["router"], []).append(r)
    out = []
    for router, rs in by_router.items():
        def mean(key: Any, rs: list[dict[str, Any]] = rs) -> float:
            return round(sum(key(r) for r in rs) / len(rs), 3)
        ttft = {q: round(mean(lambda r, q=q: r["client_ttft_ms"][q]), 1) for q in ("p50", "p99")}
        row = {"router": router, "runs": len(rs), "client_ttft_ms": ttft,
               "hit_ratio": mean(lambda r: r["hit_ratio"]),
               "goodput_rps": mean(lambda r: r["goodput_rps"])}
        if all("floor_ttft_ms" in r for r in rs):
            row["floor_p99_ms"] = round(mean(lambda r: r["floor_ttft_ms"]["p99"]), 1)
            row["goodput_ceiling_rps"] = mean(lambda r: r["goodput_ceiling_rps"])
        if all("pooled_ttft_ms" in r for r in rs):
            row["pooled_p99_ms"] = round(mean(lambda r: r["pooled_ttft_ms"]["p99"]), 1)
            row["pooled_goodput_rps"] = mean(lambda r: r["pooled_goodput_rps"])
        one = rs[0]
        if len(rs) == 1 and "goodput_ci95" in one:
            # one run: its own intervals (with repeats, their spread is the measure)
            row["ci95"] = {"goodput_rps": one["goodput_ci95"],
                           "p99": one["client_ttft_ms"].get("p99_ci95")}
        out.append(row)
    return out


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets at 80% (and goodput at 95%) of capacity, kvgate vs the best peer
    (each router's mean over repeats). A target not met is called out of reach when
    kvgate's own floor (``benchlib.floor``: what no router can beat on that stream) is
    already past it, and past the pooled ideal when that is (a reference, not a bound)."""
    out = []

    def line(ok: bool, text: str, reach: str = "", pooled: str = "", noise: str = "") -> None:
        if ok:
            out.append(f"[met] {text}")
        elif reach:
            out.append(f"[out of reach] {text}: {reach}")
        elif pooled:
            out.append(f"[NOT met, past the pooled ideal] {text}: {pooled}")
        else:
            out.append(f"[NOT met] {text}{noise}")

    cells: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["workload"], r["load"]), []).append(r)
    for (wl, load), runs in sorted(cells.items()):
        cell = mean_per_router(runs)
        kv = next((r for r in cell if r["router"] == "kvgate"), None)
        if kv is None:
            continue
        if abs(load - 0.8) < 1e-9:
            hit = best_peer(cell, lambda r: r["hit_ratio"], lower=False)
            p99 = best_peer(cell, lambda r: r["client_ttft_ms"]["p99"], lower=True)
            good = best_peer(cell, lambda r: r["goodput_rps"], lower=False)
            if hit:
                line(kv["hit_ratio"] >= hit[1] - 0.005,
                     f"{wl} 80%: hit ratio {kv['hit_ratio']:.3f} >= best peer {hit[1]:.3f} "
                     f"({hit[0]}) - 0.005")  # no noise label: see ``overlap``
            if p99:
                want, floor_p99 = 0.8 * p99[1], kv.get("floor_p99_ms", 0.0)
                pooled_p99 = kv.get("pooled_p99_ms", 0.0)
                line(kv["client_ttft_ms"]["p99"] <= want,
                     f"{wl} 80%: client TTFT p99 {kv['client_ttft_ms']['p99']} ms <= 0.8 x "
                     f"best peer {p99[1]} ({p99[0]})",
                     f"the floor's p99 is {floor_p99} ms" if floor_p99 > want else "",
                     f"its p99 is {pooled_p99} ms" if pooled_p99 > want else "",
                     overlap(kv, cell, p99[0], "p99", 0.8, False))
            if good:
                line(kv["goodput_rps"] >= good[1],
                     f"{wl} 80%: goodput {kv['goodput_rps']} >= best peer {good[1]} ({good[0]})",
                     noise=overlap(kv, cell, good[0], "goodput_rps", 1.0, True))
            rr = next((r for r in cell if r["router"] == "round_robin"), None)
            if wl == "unique" and rr:
                line(kv["client_ttft_ms"]["p50"] <= 1.02 * rr["client_ttft_ms"]["p50"],
                     f"unique 80%: client TTFT p50 {kv['client_ttft_ms']['p50']} within 2% "
                     f"of round robin {rr['client_ttft_ms']['p50']}")
        if abs(load - 0.95) < 1e-9:
            good = best_peer(cell, lambda r: r["goodput_rps"], lower=False)
            if good:
                want, ceiling = 1.1 * good[1], kv.get("goodput_ceiling_rps", math.inf)
                pooled_good = kv.get("pooled_goodput_rps", math.inf)
                line(kv["goodput_rps"] >= want,
                     f"{wl} 95%: goodput {kv['goodput_rps']} >= 1.1 x best peer {good[1]} "
                     f"({good[0]})",
                     f"the ceiling is {ceiling}" if ceiling < want else "",
                     f"its goodput is {pooled_good}" if pooled_good < want else "",
                     overlap(kv, cell, good[0], "goodput_rps", 1.1, True))
    return out


def overlap(kv: dict[str, Any], cell: list[dict[str, Any]], peer: str, metric: str,
            times: float, higher: bool) -> str:
    """For a target not met in one run each: whether kvgate's 95% interval reaches the
    target's (the peer's, times ``times``). Then one run cannot tell the
    two apart; the verdict stays "not met", and repeats are what decide.

    Used for p99 and goodput, which move between runs of one router on one stream (the
    machine, and who queues behind whom). Not for the hit ratio: on the same stream it
    is steady from run to run (hot_prefix 0.908 / 0.912 / 0.916 in three sweeps against
    vllm-router cache_aware's 0.932 / 0.932 / 0.931), and intervals from resampling each
    run's requests on its own (unpaired) are ten times wider than that."""
    other = next((r for r in cell if r["router"] == peer), None)
    mine, theirs = kv.get("ci95", {}).get(metric), (other or {}).get("ci95", {}).get(metric)
    if not mine or not theirs or any(math.isnan(v) for v in (*mine, *theirs)):
        return ""
    lo, hi = theirs[0] * times, theirs[1] * times
    if (mine[1] >= lo) if higher else (mine[0] <= hi):
        return (f"; within one run's noise: 95% intervals kvgate {mine[0]:.1f}-"
                f"{mine[1]:.1f}, target {lo:.1f}-{hi:.1f}")
    return ""


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| workload | load | router | hit ratio | client TTFT p50 / p90 / p99 ms "
             "(p99 95% CI) | engine TTFT p50 / p99 | floor p50 / p99 | pooled ideal p99 · "
             "goodput | goodput/s (ceiling) | SLO met | imbalance | failed |",
             "|---|---:|---|---:|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        c, e = r["client_ttft_ms"], r["engine_ttft_ms"]
        f = r.get("floor_ttft_ms")
        floor_ = f"{f['p50']} / {f['p99']}" if f else "-"
        pool = r.get("pooled_ttft_ms")
        pooled = f"{pool['p99']} · {r['pooled_goodput_rps']}" if pool else "-"
        ceiling = f" ({r['goodput_ceiling_rps']})" if "goodput_ceiling_rps" in r else ""
        lines.append(
            f"| {r['workload']} | {r['load']:.0%} | {r['router']} | {r['hit_ratio']:.3f} | "
            f"{c['p50']} / {c['p90']} / {c['p99']} ({c['p99_ci95'][0]}-{c['p99_ci95'][1]}) | "
            f"{e['p50']} / {e['p99']} | {floor_} | {pooled} | {r['goodput_rps']}{ceiling} | "
            f"{r['slo_met']:.0%} | {r['imbalance']} | {r['failed']} |")
    return lines


def per_load(rows: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]
             ) -> list[tuple[float, float]]:
    """(load, mean of value over the repeats) in load order."""
    by: dict[float, list[float]] = {}
    for r in rows:
        by.setdefault(r["load"], []).append(value(r))
    return [(load, sum(v) / len(v)) for load, v in sorted(by.items())]


COLORS = {"round_robin": "#9a9a9a", "seed": "#e0a040", "kvgate": "#1f6fb2",
          "kvgate:loadaware": "#6a9fd0", "kvgate:cache_aware": "#9ac0e0",
          "vllm-router:cache_aware": "#d0402a", "vllm-router:power_of_two": "#f09080",
          "sglang:cache_aware": "#2a9a40", "sglang:power_of_two": "#90d090"}


def charts(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    routers = list(dict.fromkeys(r["router"] for r in rows))
    cols = min(3, len(workloads))
    nrows = math.ceil(len(workloads) / cols)
    colors = COLORS
    for metric, title, log in (("p99", "client TTFT p99, ms (lower is better)", True),
                               ("goodput", "goodput, requests/s within the TTFT objective "
                                           "(higher is better)", False)):
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows),
                                 squeeze=False)
        def value(r: dict[str, Any], metric: str = metric) -> float:
            return r["client_ttft_ms"]["p99"] if metric == "p99" else r["goodput_rps"]

        def bound(r: dict[str, Any], metric: str = metric) -> float | None:
            if metric == "p99":
                return r["floor_ttft_ms"]["p99"] if "floor_ttft_ms" in r else None
            return r.get("goodput_ceiling_rps")

        for ax, wl in zip(axes.flat, workloads, strict=False):
            for router in routers:
                pts = per_load([r for r in rows if r["workload"] == wl
                                and r["router"] == router], value)
                if pts:
                    ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o",
                            label=router, color=colors.get(router),
                            linewidth=2.4 if router == "kvgate" else 1.2)
            # kvgate's own floor (or ceiling): what no router can beat on that stream
            mine = [r for r in rows if r["workload"] == wl and r["router"] == "kvgate"
                    and bound(r) is not None]
            pts = per_load(mine, lambda r: bound(r) or 0.0)
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], color="black",
                        linestyle="--", linewidth=1.0,
                        label="floor (no router below)" if metric == "p99"
                        else "ceiling (no router above)")
            ax.set_title(wl, fontsize=10)
            ax.set_xlabel("offered load, % of capacity", fontsize=8)
            if log:
                ax.set_yscale("log")
            ax.tick_params(labelsize=8)
        for ax in list(axes.flat)[len(workloads):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
        fig.savefig(out / f"{'ttft_p99' if metric == 'p99' else 'goodput'}_vs_load.png",
                    dpi=90)
        plt.close(fig)
    trade_chart(rows, out)


def trade_chart(rows: list[dict[str, Any]], out: Path) -> None:
    """hit_vs_p99.png: per workload, at 80% load (else the middle load run), each router's
    hit ratio against its client TTFT p99, means over the repeats: what a cache hit costs
    in tail latency, at a glance (up and to the left is better)."""
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    cols = min(3, len(workloads))
    nrows = math.ceil(len(workloads) / cols)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    colors = COLORS
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    seen: dict[str, Any] = {}  # one legend entry per router
    for ax, wl in zip(axes.flat, workloads, strict=False):
        mine = [r for r in rows if r["workload"] == wl]
        loads = sorted({r["load"] for r in mine})
        load = 0.8 if 0.8 in loads else loads[len(loads) // 2]
        for row in mean_per_router([r for r in mine if r["load"] == load]):
            name = row["router"]
            x, y = row["client_ttft_ms"]["p99"], row["hit_ratio"]
            ax.scatter([x], [y], color=colors.get(name, "#555555"), label=name,
                       s=60 if name == "kvgate" else 28, zorder=3)
            if name not in colors:  # a variant (kvgate@replicate=2): named where it is
                ax.annotate(name.partition("@")[2], (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
            seen.setdefault(name if name in colors else "kvgate with a knob set (named)",
                            ax.collections[-1])
        ax.set_title(f"{wl}, {load:.0%} load", fontsize=10)
        ax.set_xscale("log")
        # plain figures at 1, 2, 3, 5 x 10^k: a panel spans well under a decade at times
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("client TTFT p99, ms", fontsize=8)
        ax.set_ylabel("hit ratio", fontsize=8)
        ax.tick_params(labelsize=7, which="both")
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(len(seen), 4),
               fontsize=8)
    fig.suptitle("hit ratio against tail latency (up and to the left is better)", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(out / "hit_vs_p99.png", dpi=90)
    plt.close(fig)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C: the finally blocks stop clusters and routers."""
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: rag and mixed at 80%%, four routers, 5 s each (what "
                         "--workloads, --loads, --seconds or --routers set stands)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--routers", default=",".join(DEFAULT_ROUTERS),
                    help=f"comma-separated, of {', '.join(ROUTERS)}; kvgate@KNOB=N[@...] "
                         "is kvgate with a knob of its rule set (kvgate@replicate=2)")
    ap.add_argument("--loads", default="0.5,0.8,0.95",
                    help="offered loads, as fractions of the measured capacity")
    ap.add_argument("--seconds", type=float, default=6.0,
                    help="arrivals measured per run, after the warm-up")
    ap.add_argument("--warmup", type=float, default=0.0,
                    help="seconds of arrivals played first in every run and not measured")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (workload, load, router)")
    ap.add_argument("--arrival", choices=("poisson", "bursty"), default="poisson")
    ap.add_argument("--capacity-seconds", type=float, default=4.0)
    ap.add_argument("--real", action="store_true",
                    help="two real vLLM CPU engines with LMCache and its controller "
                         "(scripts/vllm-cluster) instead of the simulator: the workloads that "
                         "fit them, prompts halved, 80%% load, TTFT objective 500 ms")
    ap.add_argument("--attach", type=Path, metavar="CONFIG",
                    help="with --real: use a running scripts/vllm-cluster (the kvgate config "
                         "it wrote with --config-out) instead of starting one; its cache "
                         "sizes are its own")
    ap.add_argument("--slo-ms", type=float, default=0.0,
                    help="one TTFT objective for every workload (default: each its own)")
    ap.add_argument("--dump-requests", action="store_true",
                    help="also write every run's requests as JSON lines to DIR/requests/ "
                         "(simulated clusters; benchlib/dump.py has the format)")
    ap.add_argument("--speed", type=float, default=1.0,
                    help="play every engine this many times faster (TTFT objectives shrink "
                         "with it): more requests per second, more load on this machine")
    args = ap.parse_args()
    args.model = MODEL
    if args.attach is not None and not (args.real and args.attach.is_file()):
        ap.error("--attach takes the config file of a running scripts/vllm-cluster, with --real")
    if args.real:
        workloads.SIZE = 0.5
        if args.workloads == ",".join(WORKLOADS):
            args.workloads = ",".join(REAL_WORKLOADS)
        if args.loads == "0.5,0.8,0.95":
            args.loads = "0.8"
        args.slo_ms = args.slo_ms or 500.0
    if args.quick:  # its own defaults; what the command line sets stands
        if args.workloads in (",".join(WORKLOADS), ",".join(REAL_WORKLOADS)):
            args.workloads = "rag" if args.real else "rag,mixed"
        if args.loads == "0.5,0.8,0.95":
            args.loads = "0.8"
        if args.seconds == ap.get_default("seconds"):
            args.seconds = 5.0
        if args.routers == ",".join(DEFAULT_ROUTERS):
            args.routers = ",".join(QUICK_ROUTERS)
    names = [w for w in args.workloads.split(",") if w]
    bad = [w for w in names if w not in WORKLOADS]
    routers = []
    for name in (r for r in args.routers.split(",") if r):
        try:
            routers.append(find_router(name))
        except KeyError as e:
            bad.append(str(e.args[0]))
    if bad:
        ap.error(f"unknown workloads or routers: {', '.join(bad)}")
    missing = [r.name for r in routers if not r.available]
    if missing:
        print(f"[bench] not installed, left out: {', '.join(missing)} "
              "(scripts/bench installs them)", file=sys.stderr)
        routers = [r for r in routers if r.available]
    loads = [float(x) for x in args.loads.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    t0 = time.monotonic()
    capacity: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    total = len(names) * len(loads) * len(routers) * args.repeats
    real = None
    if args.real:
        bad = [n for n in names if n not in REAL_WORKLOADS]
        if bad:
            ap.error(f"not with --real: {', '.join(bad)}")
        print("[bench] starting two real vLLM engines (scripts/vllm-cluster)", file=sys.stderr)
        real = RealCluster(2, log_dir, args.attach)
    try:
        if real is not None:
            real.start()
            args.model = real.model
        with tqdm(total=total, desc="bench", unit="run", ncols=100) as bar:
            for name in names:
                capacity[name], got = run_workload(name, loads, routers, args, log_dir, bar,
                                                   real)
                rows += got
    finally:
        if real is not None:
            real.stop()
    rows.sort(key=lambda r: (names.index(r["workload"]), r["load"],
                             [x.name for x in routers].index(r["router"]), r["repeat"]))
    elapsed = time.monotonic() - t0
    meta = {"schema": SCHEMA, "date": datetime.date.today().isoformat(),
            "command": "scripts/bench " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}",
            "arrival": args.arrival, "seconds": args.seconds, "warmup_s": args.warmup,
            "repeats": args.repeats,
            "seed": args.seed, "elapsed_s": round(elapsed),
            "speed": args.speed, "cluster": "real vLLM (CPU) x2 + LMCache" if args.real
            else "simulated",
            "slo_ms": {n: args.slo_ms or make(n, "0", 1, args.speed).slo_ms for n in names},
            "notes": {n: WORKLOADS[n](random.Random(0), 1).note for n in names}}
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "capacity_rps": {k: round(v, 2) for k, v in capacity.items()},
         "runs": rows}, indent=1))
    text = [f"{meta['date']}, `{meta['command']}`, {meta['machine']}; {args.arrival} "
            f"arrivals, {args.seconds:g} s per run"
            + (f" after a {args.warmup:g} s warm-up" if args.warmup else "")
            + f", {elapsed:.0f} s in all", "",
            "capacity (req/s, every slot busy, no router): "
            + ", ".join(f"{k} {v:.1f}" for k, v in capacity.items()), ""]
    text += table(rows) + [""] + [f"- {n}: {note}; TTFT objective {meta['slo_ms'][n]:g} ms"
                                  for n, note in meta["notes"].items()]
    text += [""] + targets(rows)
    (args.out / "results.md").write_text("\n".join(text) + "\n")
    print("\n" + "\n".join(text))
    charts(rows, args.out)
    print(f"\nwrote {args.out}/results.json, results.md and charts")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: clusters and routers stopped", file=sys.stderr)
        sys.exit(130)
