"""mitmdump's memory (RSS) under many distinct prompts and under a flood of huge ones.

Issue 11's memory targets, measured on a real ``mitmdump --mode reverse`` with the addon
and its defaults (health checks and all), against loopback stand-ins started here:
* ``distinct``: N distinct ~2 KB text prompts (default 1,000,000), each first seen, so
  each is tokenized (``/tokenize`` answers one id per word, ~350 a prompt) and looked up;
  RSS is sampled as it goes. Every cache is full long before the end.
* ``flood``: M distinct prompts of S MiB each (default 40 x 7.9 MiB: under max_body_bytes,
  so kvgate reads them), once through bare
  mitmdump and once through mitmdump + kvgate: the difference is what kvgate adds.
RSS is read from /proc (VmRSS, and VmHWM for the peak).

  .venv/bin/python scripts/bench_memory.py distinct [--prompts N] [--connections C] [--bare]
  .venv/bin/python scripts/bench_memory.py flood [--prompts M] [--mib S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
from kvgate.sim.fast import Framed, response  # noqa: E402
from kvgate.sim.ports import free_port, wait_port  # noqa: E402
from kvgate.sim.run import stop  # noqa: E402

BIN = Path(sys.executable).parent
WORDS = [f"w{i}" for i in range(5000)]


# ------------------------------------------------------------ stand-ins (own processes)


class _Stand(Framed):
    """Engine and controller in one: /tokenize (one id per word), /lookup, completions."""

    def handle(self, head: bytes, body: bytes) -> None:
        self.reply(self._reply(head, body))

    @staticmethod
    def _reply(head: bytes, body: bytes) -> bytes:
        if head.startswith(b"POST /tokenize"):
            text = json.loads(body).get("prompt", "")
            ids = [zlib.crc32(w.encode()) % 50_000 + 100 for w in text.split()]
            return response({"count": len(ids), "tokens": ids})
        if head.startswith(b"POST /lookup"):
            return response({"event_id": "e", "layout_info": {"engine-1": ["L", 256]}})
        return response({"id": "x", "choices": [{"text": "ok"}], "usage": {}})


async def _serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Stand, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------ the client


def _prompt(i: int, size: int) -> str:
    words = []
    n, k = 0, i
    while n < size:
        w = WORDS[(k * 2654435761) % len(WORDS)]
        words.append(w)
        n += len(w) + 1
        k += 1
    return f"request {i} " + " ".join(words)


async def _drive(port: int, count: int, conns: int, size: int, start: int,
                 on_progress: object = None) -> int:
    done = 0
    failed = 0

    async def one(k: int) -> None:
        nonlocal done, failed
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
        try:
            i = k
            while i < count:
                body = json.dumps({"model": "m", "prompt": _prompt(start + i, size),
                                   "max_tokens": 4}).encode()
                writer.write(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                             f"application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                             .encode() + body)
                head = await reader.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        n = int(line[15:])
                await reader.readexactly(n)
                if not head.startswith(b"HTTP/1.1 200"):
                    failed += 1
                done += 1
                i += conns
        finally:
            writer.close()

    async def report() -> None:
        while True:
            await asyncio.sleep(5)
            if callable(on_progress):
                on_progress(done)

    reporter = asyncio.get_running_loop().create_task(report())
    await asyncio.gather(*(one(k) for k in range(conns)))
    reporter.cancel()
    return failed


def _rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out.get("VmRSS", 0.0), out.get("VmHWM", 0.0)


def _mitmdump(port: int, stand: int, tmp: Path, kvgate: bool) -> subprocess.Popen[bytes]:
    args = [str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(port),
            "--mode", f"reverse:http://127.0.0.1:{stand}", "--set", "flow_detail=0",
            "--set", "body_size_limit=64m"]
    if kvgate:
        cfg = {"kvcache": {"vllm_endpoint": f"http://127.0.0.1:{stand}",
                           "lmcache_endpoint": f"http://127.0.0.1:{stand}"},
               "clusters": [{"name": "c", "endpoints": [
                   {"id": "engine-1", "socket_address": {"address": "127.0.0.1",
                                                          "port": stand}}]}]}
        path = tmp / "kvgate.json"
        path.write_text(json.dumps(cfg))
        args += ["-s", str(ROOT / "addon" / "kvcache.py"), "--set", f"kvcache_config={path}"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop(proc, 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["distinct", "flood"])
    ap.add_argument("--prompts", type=int, default=0)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--mib", type=float, default=7.9,
                    help="prompt MiB; 7.9 keeps the body under max_body_bytes: it is read")
    ap.add_argument("--bare", action="store_true",
                    help="distinct: mitmdump without kvgate (what mitmproxy itself grows by)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    stand_port = free_port()
    stand = subprocess.Popen([sys.executable, __file__, "distinct", "--serve", str(stand_port)])
    try:
        wait_port(stand_port)
        with tempfile.TemporaryDirectory() as tmp:
            if args.mode == "distinct":
                _distinct(args, stand_port, Path(tmp))
            else:
                _flood(args, stand_port, Path(tmp))
    finally:
        stand.terminate()
        stand.wait()


def _distinct(args: argparse.Namespace, stand: int, tmp: Path) -> None:
    count = args.prompts or 1_000_000
    port = free_port()
    proc = _mitmdump(port, stand, tmp, kvgate=not args.bare)
    what = "bare mitmdump" if args.bare else "mitmdump + kvgate"
    try:
        wait_port(port, 60)
        time.sleep(2)
        idle = _rss(proc.pid)[0]
        print(f"{what}, started, idle: {idle:.0f} MB RSS", flush=True)
        t0 = time.monotonic()

        def progress(done: int) -> None:
            rss, hwm = _rss(proc.pid)
            print(f"  {done:>9,} prompts, {done / (time.monotonic() - t0):5.0f}/s: "
                  f"RSS {rss:.0f} MB (peak {hwm:.0f})", flush=True)

        failed = asyncio.run(_drive(port, count, args.connections, 2000, 0, progress))
        time.sleep(1)
        rss, hwm = _rss(proc.pid)
        print(f"\nafter {count:,} distinct ~2 KB prompts ({failed} failed): RSS {rss:.0f} MB, "
              f"peak {hwm:.0f} MB (started at {idle:.0f} MB)")
    finally:
        _stop(proc)


def _flood(args: argparse.Namespace, stand: int, tmp: Path) -> None:
    count = args.prompts or 40
    size = int(args.mib * 1024 * 1024)
    rows = []
    for kvgate in (False, True):
        port = free_port()
        proc = _mitmdump(port, stand, tmp, kvgate)
        try:
            wait_port(port, 60)
            time.sleep(2)
            idle = _rss(proc.pid)[0]
            failed = asyncio.run(_drive(port, count, args.connections, size, 0))
            time.sleep(3)  # background work on the last ones ends
            rss, hwm = _rss(proc.pid)
            name = "mitmdump + kvgate" if kvgate else "bare mitmdump"
            rows.append((name, idle, rss, hwm, failed))
            print(f"{name}: idle {idle:.0f} MB, after {count} x {args.mib:g} MiB prompts "
                  f"RSS {rss:.0f} MB, peak {hwm:.0f} MB ({failed} failed)", flush=True)
        finally:
            _stop(proc)
    print(f"\n| {count} distinct {args.mib:g} MiB prompts, {args.connections} connections | "
          "idle MB | after MB | peak MB |\n|---|---:|---:|---:|")
    for name, idle, rss, hwm, _ in rows:
        print(f"| {name} | {idle:.0f} | {rss:.0f} | {hwm:.0f} |")
    print(f"\nkvgate adds {rows[1][2] - rows[0][2]:+.0f} MB after, "
          f"{rows[1][3] - rows[0][3]:+.0f} MB at the peak")


if __name__ == "__main__":
    main()
