"""CPU of kvgate's own hooks per request, in-process: no proxy, no network.

Runs the addon's request, responseheaders and response hooks on prepared flows (the
64 prompts of bench_overhead) under mitmproxy's test context, with the lookup answer
already known (lookup_cache_ttl) and with the addon disabled. Shows what the addon's
Python costs apart from mitmproxy's per-flow machinery and the network. Prints a table.
Run: .venv/bin/python scripts/bench_hooks.py [--requests N]

``--instructions``: the same loop (enabled, answer reused) under valgrind's callgrind,
counting only the timed requests: instructions per request, repeatable to a fraction of a
percent, in ~15 s. A quick check of a change before ``scripts/bench_instructions``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_overhead import bodies  # noqa: E402
from mitmproxy.proxy.mode_specs import ProxyMode  # noqa: E402
from mitmproxy.test import taddons, tflow  # noqa: E402

from kvgate.addon import KVCacheAddon  # noqa: E402
from kvgate.placement.layout import Placement  # noqa: E402
from kvgate.request.parsing import cache_key, parse_body  # noqa: E402


def _callgrind(on: bool) -> None:
    """Counting on or off in the callgrind running this process."""
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                   check=True, stdout=subprocess.DEVNULL)


async def per_request_us(enabled: bool, n: int, tmp: Path,
                         count: Callable[[bool], None] | None = None) -> float:
    cfg = {"kvcache": {"enabled": enabled, "vllm_endpoint": "http://127.0.0.1:1",
                       "lmcache_endpoint": "http://127.0.0.1:2", "lookup_cache_ttl": "1h",
                       "health_check_interval": 0, "metrics_interval": 0},
           "clusters": [{"name": "bench", "endpoints": [
               {"id": f"engine-{i}", "socket_address": {"address": "127.0.0.1",
                                                        "port": 9000 + i}} for i in (1, 2)]}]}
    path = tmp / f"hooks-{enabled}.json"
    path.write_text(json.dumps(cfg))
    addon = KVCacheAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, kvcache_config=str(path))
        gw = addon.gateway
        assert gw is not None
        flows = []
        for body in bodies():
            parsed = parse_body(body, "")
            key = cache_key(parsed.model, parsed.key_text)
            gw.token_cache.put(key, tuple(range(300)))  # tokens and an answer known
            gw.lookups.overlay(key, [Placement("engine-1", "LocalCPUBackend", 256)], "engine-1",
                               300)
            f = tflow.tflow(resp=False)
            f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9001")
            f.request.method, f.request.path = "POST", "/v1/completions"
            f.request.host, f.request.port = "127.0.0.1", 9001
            f.request.content = body
            flows.append(f)
        resp = tflow.tresp()

        async def run(count: int) -> None:
            for i in range(count):
                f = flows[i % len(flows)]
                f.response = None
                f.metadata.clear()
                await addon.request(f)
                f.response = resp
                addon.responseheaders(f)
                addon.response(f)

        await run(2000)
        if count is not None:
            count(True)
        t0 = time.perf_counter()
        await run(n)
        elapsed = time.perf_counter() - t0
        if count is not None:
            count(False)
        addon.done()
    return elapsed / n * 1e6


def instructions(n: int) -> float:
    """Instructions per request of the enabled hooks, from a run under callgrind."""
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind: apt install valgrind")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                        f"--callgrind-out-file={out}", sys.executable, __file__,
                        "--counted", "--requests", str(n)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
        return int(totals[0].split()[1]) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per request under callgrind instead of timing")
    ap.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)  # under valgrind
    args = ap.parse_args()
    if args.counted:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(per_request_us(True, args.requests, Path(tmp), _callgrind))
        return
    if args.instructions:
        n = min(args.requests, 2000)
        print(f"enabled, lookup answer reused: {instructions(n) / 1e3:.1f} k instructions "
              f"per request ({n} requests, in-process hooks)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(label, asyncio.run(per_request_us(enabled, args.requests, Path(tmp))))
                for label, enabled in (("enabled: false", False),
                                       ("enabled, lookup answer reused", True))]
    print("| kvgate hooks | us per request |\n|---|---:|")
    for label, us in rows:
        print(f"| {label} | {us:.1f} |")


if __name__ == "__main__":
    main()
