"""Overhead of the kvgate addon against bare mitmdump, in one run, on loopback.

Starts two fast engines and LMCache-API stand-ins (kvgate.sim.fast) as their own
processes, then for each case a fresh ``mitmdump --mode reverse`` (bare, with the
least routing addon there is -- ``floor_addon.py`` -- or with kvgate) and drives it with
a small asyncio keep-alive HTTP/1.1 client. Prints a table with throughput, latency and
the CPU mitmdump spent per request (from /proc: steadier than throughput on a shared VM).
Run it through ``scripts/bench_overhead`` (which sets up the venv).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
from kvgate.sim.ports import free_port, free_ports, wait_port  # noqa: E402
from kvgate.sim.run import stop  # noqa: E402

BIN = Path(sys.executable).parent
PROMPTS = 64




def start(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(extra_env or {})
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def bodies() -> list[bytes]:
    out = []
    for i in range(PROMPTS):
        prompt = f"conversation {i}: " + " ".join(f"word{(i * 7 + j) % 997}" for j in range(200))
        out.append(json.dumps({"model": "bench", "prompt": prompt, "max_tokens": 8}).encode())
    return out


def request_bytes(body: bytes, port: int) -> bytes:
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def one_connection(port: int, reqs: list[bytes], stop_at: float, lat: list[float],
                         offset: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    i = offset
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n")[0].decode())
            lat.append(time.perf_counter() - t0)
            done += 1
    finally:
        writer.close()
    return done


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, conns: int, seconds: float, warmup: float,
                pid: int | None = None) -> tuple[float, list[float], float]:
    """Requests per second, latencies and the CPU seconds ``pid`` spent per request."""
    reqs = [request_bytes(b, port) for b in bodies()]
    warm: list[float] = []
    await asyncio.gather(*(one_connection(port, reqs, time.perf_counter() + warmup, warm, k * 5)
                           for k in range(conns)))
    lat: list[float] = []
    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    counts = await asyncio.gather(
        *(one_connection(port, reqs, t0 + seconds, lat, k * 5) for k in range(conns)))
    elapsed = time.perf_counter() - t0
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    done = max(sum(counts), 1)
    return sum(counts) / elapsed, lat, cpu / done


@dataclass
class Row:
    case: str
    conns: int
    rps: float
    p50: float
    p99: float
    cpu_us: float = 0.0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def run_case(name: str, conns: int, backends: list[int], ctl_port: int | None,
             seconds: float, tmp: Path, lookup_budget: str = "50ms",
             lookup_cache_ttl: str | None = None) -> Row:
    port = free_port()
    args = [str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(port),
            "--mode", f"reverse:http://127.0.0.1:{backends[0]}", "--set", "flow_detail=0"]
    env: dict[str, str] = {}
    if name == FLOOR:
        args += ["-s", str(ROOT / "scripts" / "floor_addon.py")]
        env["KVGATE_FLOOR_ENGINES"] = ",".join(str(b) for b in backends)
    if ctl_port is not None:
        kv: dict = {
            "vllm_endpoint": f"http://127.0.0.1:{backends[0]}",
            "lmcache_endpoint": f"http://127.0.0.1:{ctl_port}",
            "lookup_routing_timeout": lookup_budget,
        }
        if lookup_cache_ttl is not None:
            kv["lookup_cache_ttl"] = lookup_cache_ttl
        cfg = {
            "kvcache": kv,
            "clusters": [{"name": "bench", "endpoints": [
                {"id": f"engine-{i + 1}", "socket_address": {"address": "127.0.0.1",
                                                              "port": b}}
                for i, b in enumerate(backends)]}],
        }
        path = tmp / f"bench-{port}.json"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        args += ["-s", str(ROOT / "addon" / "kvcache.py"), "--set", f"kvcache_config={path}"]
    proc = start(args, env)
    try:
        wait_port(port)
        time.sleep(1.0)  # let the script load
        rps, lat, cpu = asyncio.run(drive(port, conns, seconds, warmup=1.0, pid=proc.pid))
    finally:
        stop(proc)
    return Row(name, conns, rps, pct(lat, 0.5), pct(lat, 0.99), cpu * 1e6)


BARE = "bare mitmdump"
FLOOR = "mitmdump + round-robin floor addon"
ADDON = "mitmdump + kvgate"
ASK_ALWAYS = "+ kvgate, lookup_cache_ttl 0"


def median_row(rows: list[Row]) -> Row:
    return Row(rows[0].case, rows[0].conns, statistics.median(r.rps for r in rows),
               statistics.median(r.p50 for r in rows), statistics.median(r.p99 for r in rows),
               statistics.median(r.cpu_us for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of every case (medians are shown: single runs vary +-15%%)")
    ap.add_argument("--lookup-ms", type=float, default=40.0, help="slow-lookup delay")
    ap.add_argument("--json", type=Path, help="also write the median rows here")
    ap.add_argument("--connections", default="1,16,32",
                    help="which of the 1-, 16- and 32-connection cases to run")
    args = ap.parse_args()
    wanted = {int(c) for c in args.connections.split(",") if c.strip()}
    if not wanted or wanted - {1, 16, 32}:
        ap.error("--connections: a list of 1, 16, 32")

    engines, fast_ctl, slow_ctl = free_ports(2), free_port(), free_port()
    fast = [sys.executable, "-m", "kvgate.sim.fast"]
    procs = [start(fast + ["engine", "--port", str(b), "--id", f"engine-{i + 1}"])
             for i, b in enumerate(engines)]
    procs += [
        start(fast + ["controller", "--port", str(fast_ctl)]),
        start(fast + ["controller", "--port", str(slow_ctl), "--delay",
                      str(args.lookup_ms / 1000)]),
    ]
    slow_name = f"+ kvgate, lookups {args.lookup_ms:g} ms"
    cases: list[tuple[str, int, int | None, str, str | None]] = []
    for conns in sorted(wanted - {32}):
        cases += [(BARE, conns, None, "50ms", None), (FLOOR, conns, None, "50ms", None),
                  (ADDON, conns, fast_ctl, "50ms", None),
                  (ASK_ALWAYS, conns, fast_ctl, "50ms", "0")]
    if 32 in wanted:
        cases += [(BARE, 32, None, "50ms", None), (slow_name, 32, slow_ctl, "200ms", None),
                  (slow_name + ", lookup_cache_ttl 0", 32, slow_ctl, "200ms", "0")]
    runs: dict[tuple[str, int], list[Row]] = {}
    try:
        for p in (*engines, fast_ctl, slow_ctl):
            wait_port(p)
        with tempfile.TemporaryDirectory() as tmp:
            bar = tqdm(total=len(cases) * args.repeats, desc="cases", unit="case")
            for rep in range(args.repeats):
                # alternate the order so drift on the machine hits every case alike
                for name, conns, ctl, budget, ttl in (cases if rep % 2 == 0 else cases[::-1]):
                    row = run_case(name, conns, engines, ctl, args.seconds, Path(tmp), budget,
                                   ttl)
                    runs.setdefault((name, conns), []).append(row)
                    bar.update()
            bar.close()
    finally:
        for p in procs:
            stop(p)

    rows = [median_row(runs[(name, conns)]) for name, conns, *_ in cases]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.seconds:g} s per case, median of "
          f"{args.repeats} rounds; 2 engines\n")
    print("| case | connections | req/s | p50 ms | p99 ms | mitmdump CPU us/req "
          "| req/s of each round |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        each = " / ".join(f"{x.rps:.0f}" for x in runs[(r.case, r.conns)])
        print(f"| {r.case} | {r.conns} | {r.rps:.0f} | {r.p50:.2f} | {r.p99:.2f} "
              f"| {r.cpu_us:.0f} | {each} |")
    by = {(r.case, r.conns): r for r in rows}
    print()
    for conns in sorted(wanted - {32}):
        bare = by[(BARE, conns)]
        for case in (FLOOR, ADDON, ASK_ALWAYS):
            addon = by[(case, conns)]
            print(f"{conns:>2} conn, {case}: throughput ratio {addon.rps / bare.rps:.2f} "
                  f"(target >= 0.90), p50 added {addon.p50 - bare.p50:+.2f} ms"
                  + (" (target <= 1 ms)" if conns == 1 else "")
                  + f", CPU/request {addon.cpu_us / max(bare.cpu_us, 1e-9):.2f}x bare")
    if 32 not in wanted:
        rows_32: list[Row] = []
    else:
        rows_32 = rows[-2:]
        backend_ms = by[(BARE, 1)].p50 if (BARE, 1) in by else 1.0
        bound = 32 / ((args.lookup_ms + backend_ms) / 1000)
        ceiling = by[(BARE, 32)].rps
    for r in rows_32:
        print(f"{r.case}: {r.rps:.0f} req/s = {r.rps / bound:.2f} x the bound "
              f"32 / ({args.lookup_ms:g} ms + {backend_ms:.2f} ms) = {bound:.0f} "
              f"(target >= 0.80); bare mitmdump itself does {ceiling:.0f} at 32 connections")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))


if __name__ == "__main__":
    main()
