"""Machine instructions mitmdump executes per request, counted by valgrind's callgrind.

Wall-clock throughput on a shared 2-core VM swings 10-40% between rounds of the same case,
more than the 10% the overhead target allows. Instruction counts do not depend on what
else the machine does: the same run gives the same count to within a fraction of a
percent. For each case this starts ``mitmdump`` under callgrind (instrumentation off),
warms it up, switches counting on for a fixed number of keep-alive requests (the 64
prompts of bench_overhead against the same fast engines and LMCache stand-in), switches
it off, and divides. Callgrind runs the proxy ~50x slower, so anything timed in seconds
(lookup-answer expiry, the health monitor) would happen ~50x too often per request; the
kvgate rows therefore fix those (see CASES), and the background work is measured on its
own, per second of an idle gateway.

Needs valgrind (``apt install valgrind``). Run it through ``scripts/bench_instructions``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_overhead import BIN, bodies, request_bytes, start, stop  # noqa: E402

from kvgate.sim.ports import free_port, free_ports, wait_port  # noqa: E402

QUIET = {"health_check_interval": 0, "metrics_interval": 0}
# name -> (what is loaded, kvgate settings)
CASES: dict[str, tuple[str, dict]] = {
    "bare mitmdump": ("bare", {}),
    "+ round-robin floor addon": ("floor", {}),
    "+ kvgate, lookup answer reused": (
        "kvgate", {"lookup_cache_ttl": "1h", "lookup_stale_ttl": "1h", **QUIET}),
    "+ kvgate, /lookup on every request": ("kvgate", {"lookup_cache_ttl": 0, **QUIET}),
}


async def send(port: int, count: int, conns: int) -> None:
    reqs = [request_bytes(b, port) for b in bodies()]

    async def one(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(count // conns):
                writer.write(reqs[(k * 5 + i) % len(reqs)])
                head = await reader.readuntil(b"\r\n\r\n")
                match = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(match.group(1)) if match else 0)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.split(b"\r\n")[0].decode())
        finally:
            writer.close()

    await asyncio.gather(*(one(k) for k in range(conns)))


def counted(out: Path) -> int:
    """The instructions callgrind collected while counting was on."""
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


SHORT = {"bare": "bare mitmdump", "floor": "+ round-robin floor addon",
         "reused": "+ kvgate, lookup answer reused",
         "asked": "+ kvgate, /lookup on every request"}


def measure(kind: str, kv: dict, engines: list[int], ctl: int, tmp: Path, requests: int,
            conns: int, idle: float = 0.0) -> int:
    port = free_port()
    out = tmp / f"callgrind-{port}.out"
    args = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}", str(BIN / "python"), str(BIN / "mitmdump"), "-q",
            "--listen-host", "127.0.0.1", "-p", str(port),
            "--mode", f"reverse:http://127.0.0.1:{engines[0]}", "--set", "flow_detail=0"]
    env: dict[str, str] = {}
    if kind == "floor":
        args += ["-s", str(ROOT / "scripts" / "floor_addon.py")]
        env["KVGATE_FLOOR_ENGINES"] = ",".join(str(p) for p in engines)
    elif kind == "kvgate":
        cfg = {"kvcache": {"vllm_endpoint": f"http://127.0.0.1:{engines[0]}",
                           "lmcache_endpoint": f"http://127.0.0.1:{ctl}",
                           # callgrind is slow: a budget that never cuts a lookup short
                           "lookup_routing_timeout": "5s", **kv},
               "clusters": [{"name": "bench", "endpoints": [
                   {"id": f"engine-{i + 1}",
                    "socket_address": {"address": "127.0.0.1", "port": p}}
                   for i, p in enumerate(engines)]}]}
        path = tmp / f"kvgate-{port}.json"
        path.write_text(json.dumps(cfg))
        args += ["-s", str(ROOT / "addon" / "kvcache.py"), "--set", f"kvcache_config={path}"]
    proc = start(args, env)
    control = shutil.which("callgrind_control") or "callgrind_control"
    try:
        wait_port(port, 300)
        time.sleep(2.0)
        asyncio.run(send(port, 320, conns))  # first sights, connections, caches
        subprocess.run([control, "-i", "on", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if idle:
            time.sleep(idle)
        else:
            asyncio.run(send(port, requests, conns))
        subprocess.run([control, "-i", "off", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:  # under valgrind, shutting down and writing the counts takes a while
        stop(proc, timeout=180)
    return counted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1000,
                    help="counted requests per case (far fewer and the window's fixed costs show)")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--idle-seconds", type=float, default=10.0,
                    help="how long the idle gateway's background work is counted")
    ap.add_argument("--rate", type=float, default=600.0,
                    help="req/s to spread the background work over in the summary")
    ap.add_argument("--cases", default="",
                    help="only these cases, comma-separated: bare, floor, reused, asked "
                         "(default: all, and the idle gateway's background work)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench_instructions needs valgrind: apt install valgrind")

    engines, ctl = free_ports(2), free_port()
    fast = [sys.executable, "-m", "kvgate.sim.fast"]
    procs = [start(fast + ["engine", "--port", str(b), "--id", f"engine-{i + 1}"])
             for i, b in enumerate(engines)]
    procs.append(start(fast + ["controller", "--port", str(ctl)]))
    per_request: dict[str, float] = {}
    try:
        for p in (*engines, ctl):
            wait_port(p)
        with tempfile.TemporaryDirectory() as tmp:
            wanted = {SHORT[c] for c in args.cases.split(",") if c} or set(CASES)
            for name, (kind, kv) in tqdm(CASES.items(), desc="cases", unit="case"):
                if name not in wanted:
                    continue
                n = measure(kind, kv, engines, ctl, Path(tmp), args.requests,
                            args.connections)
                per_request[name] = n / args.requests
            background = 0.0
            if not args.cases:
                background = measure("kvgate", {}, engines, ctl, Path(tmp), 0, 1,
                                     idle=args.idle_seconds) / args.idle_seconds
    finally:
        for p in procs:
            stop(p)

    if "bare mitmdump" not in per_request:
        for name, n in per_request.items():
            print(f"{name}: {n / 1e6:.3f} M instructions per request")
        return
    bare = per_request["bare mitmdump"]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.requests} counted requests per case over "
          f"{args.connections} connection(s); 2 engines\n")
    print("| case | instructions per request | x bare |")
    print("|---|---:|---:|")
    for name, n in per_request.items():
        print(f"| {name} | {n / 1e6:.3f} M | {n / bare:.3f} |")
    if args.cases:
        return
    print(f"\nkvgate's background work (health and metrics polls, defaults) on an idle "
          f"gateway: {background / 1e6:.1f} M instructions per second = "
          f"{background / args.rate / 1e6:.3f} M per request at {args.rate:g} req/s "
          f"({background / args.rate / bare:.1%} of bare's request).")
    reused = per_request["+ kvgate, lookup answer reused"]
    asked = per_request["+ kvgate, /lookup on every request"]
    print(f"A /lookup on the request path costs {(asked - reused) / 1e6:.3f} M "
          f"instructions ({(asked - reused) / bare:.1%} of bare's request).")


if __name__ == "__main__":
    main()
