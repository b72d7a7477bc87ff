"""kvgate's demo: cache-aware routing vs round robin on a simulated vLLM + LMCache cluster.

For each policy it starts a fresh simulated cluster (3 engines, the twin controller; see
``kvgate-sim``) and mitmdump with the addon, then plays one multi-turn chat workload
through it: tens of conversations with long system prompts and growing histories,
interleaved, a few clients at a time, streaming. It prints a table per policy, writes
``DIR/summary.json`` and ``DIR/summary.png`` and stops everything it started.

TTFT is the engines' modelled time to first token (queueing + prefill of the uncached
tokens + loading of CPU-tier tokens), in model milliseconds: an 8B model on one H100
per engine, played faster by ``--time-scale``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "addon"))
from kvgate.sim.cli import start_on_free_ports  # noqa: E402
from kvgate.sim.engine import EngineParams  # noqa: E402
from kvgate.sim.run import gateway  # noqa: E402

POLICIES = ("kvgate", "round_robin")


@dataclass
class Conversation:
    messages: list[dict]
    questions: list[str]


@dataclass
class Result:
    ttft_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    share: Counter = field(default_factory=Counter)
    failed: int = 0

    def summary(self) -> dict:
        n = sum(self.share.values())
        ttft = sorted(self.ttft_ms)
        return {
            "prefix_hit_ratio": round(self.cached_tokens / self.prompt_tokens, 4)
            if self.prompt_tokens else 0.0,
            "ttft_p50_ms": round(statistics.median(ttft), 1) if ttft else None,
            "ttft_p99_ms": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1)
            if ttft else None,
            "share_by_endpoint": {k: round(v / n, 3) for k, v in sorted(self.share.items())},
            "requests": n,
            "failed": self.failed,
        }


def workload(conversations: int, turns: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    # a long system prompt per conversation (instructions plus the user's documents)
    systems = [" ".join(rng.choice(vocab) for _ in range(800)) for _ in range(conversations)]
    out = []
    for c in range(conversations):
        qs = [f"chat {c} turn {t}: " + " ".join(rng.choice(vocab) for _ in range(60))
              for t in range(turns)]
        out.append(Conversation([{"role": "system", "content": systems[c % len(systems)]}], qs))
    return out


def play(port: int, convs: list[Conversation], clients: int, bar: tqdm) -> Result:
    """Each client owns every clients-th conversation and cycles through its turns."""
    result = Result()
    lock = threading.Lock()

    def client(k: int) -> None:
        session = requests.Session()
        session.trust_env = False
        mine = [(c, list(c.messages)) for c in convs[k::clients]]
        for t in range(max(len(c.questions) for c in convs)):
            for conv, history in mine:
                if t >= len(conv.questions):
                    continue
                history.append({"role": "user", "content": conv.questions[t]})
                body = {"model": "sim-8b", "messages": history, "stream": True,
                        "max_tokens": 48, "stream_options": {"include_usage": True}}
                text, usage, engine, ttft = "", None, None, None
                try:
                    with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                      json=body, stream=True, timeout=60) as r:
                        r.raise_for_status()
                        engine = r.headers.get("x-engine-id")
                        ttft = float(r.headers["x-sim-ttft-ms"])
                        for line in r.iter_lines():
                            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            if event.get("usage"):
                                usage = event["usage"]
                            for ch in event.get("choices", []):
                                text += ch.get("delta", {}).get("content") or ""
                except (requests.RequestException, KeyError, ValueError):
                    with lock:
                        result.failed += 1
                    bar.update(1)
                    continue
                history.append({"role": "assistant", "content": text})
                with lock:
                    result.share[engine] += 1
                    result.ttft_ms.append(ttft)
                    if usage:
                        result.prompt_tokens += usage["prompt_tokens"]
                        result.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
                bar.update(1)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return result


def chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["#2a7ab0", "#b0b0b0"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    hits = [results[n]["prefix_hit_ratio"] for n in names]
    a.bar(names, hits, color=colors)
    a.set_ylim(0, 1)
    a.set_title("prefix-hit ratio (higher is better)")
    for i, v in enumerate(hits):
        a.text(i, v + 0.02, f"{v:.2f}", ha="center")
    width = 0.35
    xs = range(len(names))
    p50 = [results[n]["ttft_p50_ms"] for n in names]
    p99 = [results[n]["ttft_p99_ms"] for n in names]
    b.bar([x - width / 2 for x in xs], p50, width, label="p50", color=colors)
    b.bar([x + width / 2 for x in xs], p99, width, label="p99", color=colors, alpha=0.55,
          hatch="//")
    b.set_xticks(list(xs), names)
    b.set_title("TTFT, model ms (lower is better)")
    b.legend()
    fig.suptitle("kvgate vs round robin: multi-turn chat, 3 simulated engines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--conversations", type=int, default=36)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--time-scale", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # capacities below the working set (~36 x 1.2k tokens), so placement matters
    params = EngineParams(gpu_tokens=16_000, cpu_tokens=24_000, batch_slots=8, max_output=48,
                          time_scale=args.time_scale)
    convs = workload(args.conversations, args.turns, args.seed)
    total = sum(len(c.questions) for c in convs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"[demo] {total} chat turns from {args.conversations} conversations, "
          f"{args.clients} clients; 3 simulated engines + twin controller per policy")
    results: dict[str, dict] = {}
    for policy in POLICIES:
        cluster = start_on_free_ports(3, params)
        try:
            cfg = cluster.config()
            cfg["kvcache"]["enabled"] = policy == "kvgate"
            with gateway(cfg, cfg["kvcache"]["vllm_endpoint"]) as port, \
                    tqdm(total=total, desc=f"{policy:<12}", unit="req", ncols=80) as bar:
                results[policy] = play(port, convs, args.clients, bar).summary()
        except KeyboardInterrupt:
            print("\n[demo] interrupted")
            return 130
        finally:
            cluster.stop()

    print("\n| policy | prefix-hit ratio | TTFT p50 ms | TTFT p99 ms | share by endpoint "
          "| failed |")
    print("|---|---:|---:|---:|---|---:|")
    for policy, r in results.items():
        share = ", ".join(f"{k} {v:.0%}" for k, v in r["share_by_endpoint"].items())
        print(f"| {policy} | {r['prefix_hit_ratio']:.2f} | {r['ttft_p50_ms']} | "
              f"{r['ttft_p99_ms']} | {share} | {r['failed']} |")
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    chart(results, args.out / "summary.png")
    print(f"\n[demo] wrote {args.out / 'summary.json'} and {args.out / 'summary.png'}")
    kv, rr = results["kvgate"], results["round_robin"]
    ok = (kv["failed"] == 0 and rr["failed"] == 0
          and kv["prefix_hit_ratio"] > rr["prefix_hit_ratio"])
    if not ok:
        print("[demo] kvgate did not beat round robin cleanly: something is wrong",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
