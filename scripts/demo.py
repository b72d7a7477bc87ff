"""kvgate's demo (small version): cache-aware routing vs round robin, no GPU needed.

Starts 3 stub engines and a stub LMCache controller (kvgate.sim.stub) and mitmdump with
the addon, then drives a multi-turn chat workload through it twice: with kvgate routing
and with the plain balancer (enabled: false). After each answer the demo tells the
controller that the serving engine now holds that conversation's tokens, as LMCache does
when an engine stores KV. It reports how many prompt tokens were already cached on the
engine that got the request, and each engine's share. The timing model and the real
controller come with the simulated cluster (issue 3).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "addon"))

from kvgate.sim.ports import free_port, wait_port  # noqa: E402
from kvgate.sim.stub import CHUNK, tokenize_request  # noqa: E402


def workload(conversations: int, turns: int,
             seed: int) -> tuple[list[tuple[int, list[dict]]], list[list[dict]]]:
    """Interleaved turns of chats with long system prompts and growing histories."""
    rng = random.Random(seed)
    systems = [" ".join(f"rule{k}-{j}" for j in range(200)) for k in range(8)]
    convs = []
    for c in range(conversations):
        msgs = [{"role": "system", "content": systems[c % len(systems)]}]
        convs.append(msgs)
    order = [c for c in range(conversations) for _ in range(turns)]
    rng.shuffle(order)
    # keep each conversation's turns in order while interleaving conversations
    seen: Counter[int] = Counter()
    plan = []
    for c in order:
        seen[c] += 1
        plan.append((c, seen[c]))
    return [(c, [{"role": "user", "content": f"question {t} of chat {c}: "
                  + " ".join(rng.choice(["why", "how", "what", "tell", "more"])
                             for _ in range(150))}]) for c, t in plan], convs


def run(policy: str, port: int, ctl: str, plan, convs, progress: bool) -> dict:
    requests.post(ctl + "/_stub/config", json={"clear": True}, timeout=5)
    histories = [list(m) for m in convs]
    cached = total = 0
    share: Counter[str] = Counter()
    session = requests.Session()
    session.trust_env = False
    for i, (c, new_msgs) in enumerate(plan):
        histories[c].extend(new_msgs)
        body = {"model": "demo", "messages": histories[c], "max_tokens": 16}
        tokens = tokenize_request(body)
        r = session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
        r.raise_for_status()
        engine = r.headers["x-engine-id"]
        share[engine] += 1
        held = requests.post(ctl + "/lookup", json={"tokens": tokens}, timeout=5).json()
        cached += held["layout_info"].get(engine, [None, 0])[1]
        total += len(tokens)
        answer = r.json()["choices"][0]["message"]["content"]
        histories[c].append({"role": "assistant", "content": answer})
        # the serving engine now holds this prompt's KV (whole chunks), as LMCache admits it
        stored = tokens[: (len(tokens) // CHUNK) * CHUNK]
        requests.post(ctl + "/_stub/config", json={"admit": [[engine, stored]]}, timeout=5)
        if progress and ((i + 1) % max(1, len(plan) // 10) == 0 or i + 1 == len(plan)):
            done = int(30 * (i + 1) / len(plan))
            print(f"\r  {policy:<12} [{'#' * done}{'.' * (30 - done)}] {i + 1}/{len(plan)}",
                  end="", flush=True)
    if progress:
        print()
    n = sum(share.values())
    return {
        "prefix_hit_ratio": round(cached / total, 4) if total else 0.0,
        "requests": n,
        "share_by_endpoint": {k: round(v / n, 3) for k, v in sorted(share.items())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    procs: list[subprocess.Popen] = []

    def spawn(cmd: list[str]) -> None:
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=env))

    def cleanup(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, dict] = {}
    try:
        ctl_port = free_port()
        engines = {f"vllm-{i}": free_port() for i in (1, 2, 3)}
        spawn([str(BIN / "kvgate-stub"), "controller", "--port", str(ctl_port)])
        for eid, port in engines.items():
            spawn([str(BIN / "kvgate-stub"), "engine", "--port", str(port), "--id", eid])
        for port in [ctl_port, *engines.values()]:
            wait_port(port)
        ctl = f"http://127.0.0.1:{ctl_port}"
        plan, convs = workload(args.conversations, args.turns, args.seed)
        print(f"[demo] 3 stub engines, stub controller; {len(plan)} chat turns from "
              f"{args.conversations} conversations")
        with tempfile.TemporaryDirectory() as tmp:
            for policy, enabled in (("kvgate", True), ("round_robin", False)):
                cfg = {
                    "kvcache": {
                        "enabled": enabled,
                        "vllm_endpoint": f"http://127.0.0.1:{engines['vllm-1']}",
                        "lmcache_endpoint": ctl,
                        "lookup_routing_timeout": "200ms",
                        "debug_headers": True,
                    },
                    "clusters": [{"name": "vllm", "endpoints": [
                        {"id": e, "socket_address": {"address": "127.0.0.1", "port": p}}
                        for e, p in engines.items()]}],
                }
                path = Path(tmp) / f"{policy}.json"
                path.write_text(json.dumps(cfg))
                gport = free_port()
                spawn([str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p",
                       str(gport), "--mode", f"reverse:http://127.0.0.1:{engines['vllm-1']}",
                       "-s", str(ROOT / "addon" / "kvcache.py"),
                       "--set", f"kvcache_config={path}"])
                wait_port(gport)
                time.sleep(1.0)
                results[policy] = run(policy, gport, ctl, plan, convs, progress=True)
                procs[-1].send_signal(signal.SIGINT)
                procs[-1].wait(10)
    except KeyboardInterrupt:
        print("\n[demo] interrupted")
        return 130
    finally:
        cleanup()

    print("\n| policy | prefix-hit ratio | requests | share by endpoint |")
    print("|---|---:|---:|---|")
    for policy, r in results.items():
        share = ", ".join(f"{k} {v:.0%}" for k, v in r["share_by_endpoint"].items())
        print(f"| {policy} | {r['prefix_hit_ratio']:.2f} | {r['requests']} | {share} |")
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"\n[demo] wrote {args.out / 'summary.json'}")
    ok = results["kvgate"]["prefix_hit_ratio"] > results["round_robin"]["prefix_hit_ratio"]
    if not ok:
        print("[demo] kvgate did not beat round robin: something is wrong", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
