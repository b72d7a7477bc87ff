"""Event-loop CPU per request and the longest hold of the loop, by prompt length (issue 11).

In-process, on one asyncio loop, ``Gateway.route_async`` (the addon's request path) is
run for prompts of 1k, 8k, 32k and 128k tokens, given as text (tokens already in the
token cache, as for any prompt seen before) and as token ids, with the defaults:
* reused: the /lookup answer is reused (``lookup_cache_ttl`` 1 s; a repeat),
* asked: LMCache is asked for every request (``lookup_cache_ttl: 0``), over loopback
  to a fast stand-in controller (``kvgate.sim.fast``) in its own process.
Loop CPU is ``time.thread_time()`` of the loop's thread around each request (work handed
to the routing threads is not in it). The longest hold is the most process CPU (all
threads) spent between two turns of a ticker task that yields to the loop continuously:
whatever kept the loop from running, our code on it or another thread holding the GIL,
shows there; OS preemption, which stalls even an idle loop on this shared machine, does
not. Median and max over --repeats
requests per case, after one warm-up each.

  .venv/bin/python scripts/bench_long_prompts.py [--repeats 20] [--sizes 1k,8k,32k,128k]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))

from kvgate.config import from_mapping  # noqa: E402
from kvgate.gateway import Gateway  # noqa: E402
from kvgate.request.parsing import cache_key, parse_body  # noqa: E402
from kvgate.sim.ports import free_port, wait_port  # noqa: E402


def _gateway(ctl_port: int, ttl: float) -> Gateway:
    return Gateway(from_mapping({
        "kvcache": {"vllm_endpoint": "http://127.0.0.1:1",
                    "lmcache_endpoint": f"http://127.0.0.1:{ctl_port}",
                    "lookup_cache_ttl": ttl, "health_check_interval": 0,
                    "metrics_interval": 0, "lookup_routing_timeout": "2s"},
        "clusters": [{"name": "bench", "endpoints": [
            {"id": f"engine-{i}", "socket_address": {"address": "127.0.0.1", "port": 1 + i}}
            for i in (1, 2, 3)]}]}))


def _body(kind: str, n: int, salt: int) -> tuple[bytes, list[int]]:
    ids = [(salt * 7919 + i * 31) % 50_000 + 100 for i in range(n)]
    if kind == "ids":
        return json.dumps({"model": "m", "prompt": ids, "max_tokens": 8}).encode(), ids
    text = " ".join(f"w{t}" for t in ids)  # one word per token
    return json.dumps({"model": "m", "prompt": text, "max_tokens": 8}).encode(), ids


async def _case(gw: Gateway, kind: str, n: int, repeats: int) -> tuple[list[float], float]:
    body, ids = _body(kind, n, n)
    if kind == "text":  # seen before: its tokens are in the token cache
        parsed = parse_body(body, "")
        gw.token_cache.put(cache_key(parsed.model, parsed.key_text), ids)
    stop = False
    longest = 0.0

    async def ticker() -> None:
        # the process's CPU (all threads) between two turns of the loop: work on the loop,
        # or in a thread holding the GIL, held it that long. CPU rather than wall time:
        # on this shared machine the OS alone stalls an idle loop for 100+ ms
        nonlocal longest
        last = time.process_time()
        while not stop:
            await asyncio.sleep(0)
            now = time.process_time()
            longest = max(longest, now - last)
            last = now

    await gw.route_async("bench", body)  # warm-up: first sight, connections
    cpu: list[float] = []
    for _ in range(repeats):  # pass 1: CPU, nothing else on the loop
        await asyncio.sleep(0.002)
        t0 = time.thread_time()
        routed = await gw.route_async("bench", body)
        cpu.append(time.thread_time() - t0)
        assert routed.decision is not None and routed.decision.reason == "cache", routed
    tick = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0.01)
    longest = 0.0
    for _ in range(repeats):  # pass 2: the longest hold, seen by the ticker
        await gw.route_async("bench", body)
        await asyncio.sleep(0.002)
    stop = True
    await tick
    return cpu, longest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sizes", default="1k,8k,32k,128k")
    args = ap.parse_args()
    sizes = [int(s.rstrip("k")) * 1024 if s.endswith("k") else int(s)
             for s in args.sizes.split(",")]
    port = free_port()
    ctl = subprocess.Popen([sys.executable, "-m", "kvgate.sim.fast", "controller", "--port",
                            str(port), "--id", "engine-2"], stdout=subprocess.DEVNULL)
    rows = []
    try:
        wait_port(port)

        async def idle() -> float:  # the floor: the longest hold with no request at all
            longest, last, end = 0.0, time.process_time(), time.perf_counter() + 2.0
            while time.perf_counter() < end:
                await asyncio.sleep(0)
                now = time.process_time()
                longest, last = max(longest, now - last), now
            return longest

        floor = asyncio.run(idle())
        print(f"idle loop, no requests, 2 s: longest CPU hold {floor * 1e3:.2f} ms", flush=True)
        for how, ttl in (("reused", 1.0), ("asked", 0.0)):
            for kind in ("text", "ids"):
                for n in sizes:
                    gw = _gateway(port, ttl)

                    async def run(gw: Gateway = gw, kind: str = kind, n: int = n
                                  ) -> tuple[list[float], float]:
                        try:
                            return await _case(gw, kind, n, args.repeats)
                        finally:
                            gw.helpers.close_loop()

                    cpu, longest = asyncio.run(run())
                    gw.close()
                    rows.append((how, kind, n, statistics.median(cpu) * 1e3,
                                 max(cpu) * 1e3, longest * 1e3))
                    print(f"{how:6} {kind:4} {n:>7} tokens: loop CPU median "
                          f"{rows[-1][3]:.2f} ms, max {rows[-1][4]:.2f} ms; longest hold "
                          f"{rows[-1][5]:.2f} ms", flush=True)
    finally:
        ctl.terminate()
        ctl.wait()
    print("\n| lookup | prompt | tokens | loop CPU ms/request (median) | max | "
          "longest loop hold, CPU ms |")
    print("|---|---|---:|---:|---:|---:|")
    for how, kind, n, med, mx, hold in rows:
        print(f"| {how} | {kind} | {n // 1024}k | {med:.2f} | {mx:.2f} | {hold:.2f} |")
    print(f"\nThe idle loop's longest hold over 2 s, with no request at all: {floor * 1e3:.2f} ms "
          "(the clock's and the ticker's own granularity)")


if __name__ == "__main__":
    main()
