"""kvgate's routing benchmark: four workloads, four policies, one simulated cluster shape.

Every (workload, policy) pair gets a fresh simulated cluster (4 engines, twin controller,
GPU and CPU-tier capacities below the working set) and a fresh mitmdump with the addon,
and plays the same deterministic request stream (from --seed) with the same clients.

Policies:
  round_robin   the balancer alone (enabled: false)
  seed          the seed's algorithm: route only on an exact-prompt token-cache hit,
                to the longest LMCache match (policy longest_prefix, route_on_miss false)
  kvgate        the default configuration
  pooled_bound  one engine with the cache capacity and batch slots of all four: the
                hit-ratio and TTFT limit no router can beat
  loadaware, cache_aware
                kvgate with that routing policy (production-stack's score; SGLang-style
                approximate tree), on request with --policies

Metrics: prefix-hit ratio (cached prompt tokens / prompt tokens, from the engines' usage),
TTFT p50/p99 (the engines' modelled TTFT, model ms), load imbalance (max over mean of the
engines' busy time), failed requests. Writes results.json, results.md and PNG charts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import requests
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
from kvgate.sim.cli import start_on_free_ports  # noqa: E402
from kvgate.sim.engine import EngineParams  # noqa: E402
from kvgate.sim.run import gateway  # noqa: E402

POLICIES = ("round_robin", "seed", "kvgate", "pooled_bound")
PLUG_INS = ("loadaware", "cache_aware")  # further kvgate policies, compared on request
ENGINES = 4


# ---------------------------------------------------------------- workloads
# A workload is a list of client scripts; a script is a list of steps run in order. A step
# builds its request body from the conversation state, so multi-turn histories grow with
# the answers actually received.

Step = Callable[[dict], dict]


@dataclass
class Workload:
    name: str
    clients: list[list[Step]]
    note: str

    @property
    def requests(self) -> int:
        return sum(len(c) for c in self.clients)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(20000)}" for _ in range(n))


def multi_turn_chat(rng: random.Random, scale: float) -> Workload:
    # the working set must exceed the engines' capacity even in --quick: keep all 48
    convs, turns, clients = 48, 5 if scale >= 1 else 4, 8
    systems = [_words(rng, 800) for _ in range(convs)]
    questions = [[_words(rng, 60) for _ in range(turns)] for _ in range(convs)]

    def turn(c: int, t: int) -> Step:
        def step(state: dict) -> dict:
            hist = state.setdefault(c, [{"role": "system", "content": systems[c]}])
            hist.append({"role": "user", "content": questions[c][t]})
            return {"messages": list(hist), "_conv": c}
        return step

    # each client owns every clients-th conversation and interleaves them turn by turn
    scripts = [[turn(c, t) for t in range(turns) for c in range(k, convs, clients)]
               for k in range(clients)]
    return Workload("multi_turn_chat", scripts,
                    f"{convs} conversations x {turns} turns, 800-token system prompts, "
                    f"{clients} clients")


def hot_prefix(rng: random.Random, scale: float) -> Workload:
    n, clients = int(320 * scale), 32
    systems = [_words(rng, 1000) for _ in range(6)]
    weights = [1 / (i + 1) ** 1.2 for i in range(len(systems))]  # Zipf
    scripts: list[list[Step]] = [[] for _ in range(clients)]
    for i in range(n):
        sys_prompt = rng.choices(systems, weights)[0]
        q = _words(rng, 30)
        scripts[i % clients].append(
            lambda state, s=sys_prompt, q=q: {"messages": [{"role": "system", "content": s},
                                                           {"role": "user", "content": q}]})
    return Workload("hot_prefix", scripts,
                    f"{n} short questions over 6 Zipf-popular 1000-token system prompts, "
                    f"{clients} clients")


def rag(rng: random.Random, scale: float) -> Workload:
    n, clients = int(240 * scale), 8
    docs = [_words(rng, 1500) for _ in range(40)]
    scripts: list[list[Step]] = [[] for _ in range(clients)]
    for i in range(n):
        doc = docs[min(int(rng.expovariate(1 / 10)), len(docs) - 1)]
        q = _words(rng, 40)
        scripts[i % clients].append(
            lambda state, d=doc, q=q: {"prompt": f"Context: {d}\nQuestion: {q}\nAnswer:"})
    return Workload("rag", scripts,
                    f"{n} questions over 40 documents of 1500 tokens, {clients} clients")


def unique(rng: random.Random, scale: float) -> Workload:
    n, clients = int(240 * scale), 8
    scripts: list[list[Step]] = [[] for _ in range(clients)]
    for i in range(n):
        p = _words(rng, 600)
        scripts[i % clients].append(lambda state, p=p: {"prompt": p})
    return Workload("unique", scripts, f"{n} prompts of 600 tokens, no reuse, {clients} clients")


WORKLOADS = {"multi_turn_chat": multi_turn_chat, "hot_prefix": hot_prefix, "rag": rag,
             "unique": unique}


# ---------------------------------------------------------------- running


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    prompt: int = 0
    cached: int = 0
    failed: int = 0


def play(port: int, wl: Workload, bar: tqdm) -> Tally:
    tally = Tally()
    lock = threading.Lock()

    def client(script: list[Step]) -> None:
        session = requests.Session()
        session.trust_env = False
        state: dict = {}
        for step in script:
            body = step(state)
            conv = body.pop("_conv", None)
            chat = "messages" in body
            body.update({"model": "sim-8b", "max_tokens": 16})
            url = f"http://127.0.0.1:{port}/v1/{'chat/' if chat else ''}completions"
            try:
                r = session.post(url, json=body, timeout=120)
                r.raise_for_status()
                out = r.json()
                ttft = float(r.headers["x-sim-ttft-ms"])
            except (requests.RequestException, ValueError, KeyError):
                with lock:
                    tally.failed += 1
                bar.update(1)
                continue
            if conv is not None:
                state[conv].append({"role": "assistant",
                                    "content": out["choices"][0]["message"]["content"]})
            usage = out["usage"]
            with lock:
                tally.ttft.append(ttft)
                tally.prompt += usage["prompt_tokens"]
                tally.cached += usage["prompt_tokens_details"]["cached_tokens"]
            bar.update(1)

    # daemon: an interrupted run must not wait at exit for clients still mid-request
    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in wl.clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def engine_params(pooled: bool, time_scale: float) -> EngineParams:
    k = ENGINES if pooled else 1
    return EngineParams(gpu_tokens=12_000 * k, cpu_tokens=16_000 * k, batch_slots=4 * k,
                        max_output=16, time_scale=time_scale)


def run_one(wl: Workload, policy: str, time_scale: float) -> dict:
    pooled = policy == "pooled_bound"
    cluster = start_on_free_ports(1 if pooled else ENGINES, engine_params(pooled, time_scale))
    try:
        cfg = cluster.config()
        kv = cfg["kvcache"]
        kv["debug_headers"] = False
        if policy in ("round_robin", "pooled_bound"):
            kv["enabled"] = False
        elif policy == "kvgate" and os.environ.get("KVGATE_BENCH_KV"):
            kv.update(json.loads(os.environ["KVGATE_BENCH_KV"]))  # experiments only
        elif policy == "seed":
            kv.update({"policy": "longest_prefix", "route_on_miss": False, "lookup_cache_ttl": 0})
        elif policy in PLUG_INS:
            kv["policy"] = policy
        with gateway(cfg, kv["vllm_endpoint"]) as port, \
                tqdm(total=wl.requests, desc=f"{wl.name:>15} {policy:<12}", unit="req",
                     ncols=90, leave=False) as bar:
            t0 = time.monotonic()
            tally = play(port, wl, bar)
            wall = time.monotonic() - t0
        busy = [e.busy_ms for e in cluster.engines.values()]
    finally:
        cluster.stop()
    ttft = sorted(tally.ttft)
    mean_busy = statistics.mean(busy) if busy else 0.0
    return {
        "prefix_hit_ratio": round(tally.cached / tally.prompt, 4) if tally.prompt else 0.0,
        "ttft_p50_ms": round(statistics.median(ttft), 1) if ttft else None,
        "ttft_p99_ms": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1)
        if ttft else None,
        "imbalance": round(max(busy) / mean_busy, 3) if mean_busy else 1.0,
        "failed": tally.failed,
        "wall_s": round(wall, 1),
    }


def check_targets(res: dict) -> list[str]:
    out: list[str] = []
    if any(set(POLICIES) - set(by) for by in res.values()):
        return out  # the targets compare all four

    def line(ok: bool, text: str) -> None:
        out.append(f"[{'met' if ok else 'NOT met'}] {text}")

    m = res.get("multi_turn_chat")
    if m:
        kv, seed, rr, pb = m["kvgate"], m["seed"], m["round_robin"], m["pooled_bound"]
        line(kv["prefix_hit_ratio"] >= 0.9 * pb["prefix_hit_ratio"],
             f"multi_turn_chat hit ratio {kv['prefix_hit_ratio']:.3f} >= 0.9 x pooled "
             f"{pb['prefix_hit_ratio']:.3f}")
        line(kv["prefix_hit_ratio"] >= 2 * seed["prefix_hit_ratio"],
             f"multi_turn_chat hit ratio {kv['prefix_hit_ratio']:.3f} >= 2 x seed "
             f"{seed['prefix_hit_ratio']:.3f}")
        line(kv["ttft_p50_ms"] <= 0.35 * rr["ttft_p50_ms"],
             f"multi_turn_chat TTFT p50 {kv['ttft_p50_ms']} <= 0.35 x round robin "
             f"{rr['ttft_p50_ms']}")
    h = res.get("hot_prefix")
    if h:
        kv, rr = h["kvgate"], h["round_robin"]
        line(kv["imbalance"] <= 1.5, f"hot_prefix imbalance {kv['imbalance']} <= 1.5")
        line(kv["ttft_p99_ms"] <= rr["ttft_p99_ms"],
             f"hot_prefix TTFT p99 {kv['ttft_p99_ms']} <= round robin {rr['ttft_p99_ms']}")
    u = res.get("unique")
    if u:
        kv, rr = u["kvgate"], u["round_robin"]
        line(kv["ttft_p50_ms"] <= 1.05 * rr["ttft_p50_ms"],
             f"unique TTFT p50 {kv['ttft_p50_ms']} within 5% of round robin {rr['ttft_p50_ms']}")
    return out


def charts(res: dict, out: Path, policies: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res)
    colors = {"round_robin": "#b0b0b0", "seed": "#e0a040", "kvgate": "#2a7ab0",
              "pooled_bound": "#60a060", "loadaware": "#a060c0", "cache_aware": "#c06060"}
    for metric, title in (("prefix_hit_ratio", "prefix-hit ratio (higher is better)"),
                          ("ttft_p50_ms", "TTFT p50, model ms (lower is better)"),
                          ("ttft_p99_ms", "TTFT p99, model ms (lower is better)")):
        fig, ax = plt.subplots(figsize=(9, 3.6))
        width = 0.8 / len(policies)
        for j, pol in enumerate(policies):
            xs = [i + (j - (len(policies) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [res[w][pol][metric] or 0 for w in names], width, label=pol,
                   color=colors[pol])
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=100)
        plt.close(fig)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (CI timeouts, ``kill``) unwinds like Ctrl-C: the ``finally`` blocks stop the
    cluster and mitmdump instead of leaving them running."""
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a third of the requests")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help=f"comma-separated, of {', '.join(POLICIES + PLUG_INS)}")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scale = 0.35 if args.quick else 1.0
    results: dict[str, dict] = {}
    notes = {}
    t0 = time.monotonic()
    names = [w for w in args.workloads.split(",") if w]
    policies = [p for p in args.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES + PLUG_INS)
    if unknown:
        ap.error(f"unknown policies: {', '.join(sorted(unknown))}")
    with tqdm(total=len(names) * len(policies), desc="bench", unit="run", ncols=90) as outer:
        for name in names:
            wl = WORKLOADS[name](random.Random(f"{args.seed}:{name}"), scale)
            notes[name] = wl.note
            results[name] = {}
            for policy in policies:
                results[name][policy] = run_one(wl, policy, args.time_scale)
                outer.update(1)
    lines = [f"machine: {platform.machine()}, Python {platform.python_version()}; "
             f"{'--quick' if args.quick else 'full'} run, seed {args.seed}, "
             f"{time.monotonic() - t0:.0f} s", ""]
    lines += ["| workload | policy | prefix-hit ratio | TTFT p50 ms | TTFT p99 ms | imbalance "
              "| failed |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, by in results.items():
        for pol, r in by.items():
            lines.append(f"| {name} | {pol} | {r['prefix_hit_ratio']:.3f} | {r['ttft_p50_ms']} "
                         f"| {r['ttft_p99_ms']} | {r['imbalance']} | {r['failed']} |")
    lines += [""] + [f"- {n}: {note}" for n, note in notes.items()]
    lines += [""] + check_targets(results)
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "results.json").write_text(json.dumps({"workloads": results}, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    charts(results, args.out, policies)
    print(f"\nwrote {args.out}/results.json, results.md and charts")
    failed = sum(r["failed"] for by in results.values() for r in by.values())
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: cluster and gateway stopped", file=sys.stderr)
        sys.exit(130)
