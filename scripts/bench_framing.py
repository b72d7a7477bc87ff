"""Instructions per /lookup call of the request-path client (clients/aio_http.py).

Counts, with valgrind's callgrind, the machine instructions a process executes for N
keep-alive POSTs to a fast loopback LMCache stand-in (kvgate.sim.fast), as the
difference between a run of N1 and one of N2 calls, so start-up cancels out. Used to
choose between hand framing and httptools (issue 11): point ``--addon`` at another
checkout's ``addon`` folder to count its client, e.g. the previous commit's, made with
``git archive HEAD | tar -x -C /tmp/old``.

  .venv/bin/python scripts/bench_framing.py [--addon DIR] [--calls 2000,6000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def _calls(port: int, n: int) -> None:
    from kvgate.clients.aio_http import AsyncHelper
    from kvgate.clients.breaker import CircuitBreaker

    helper = AsyncHelper("lmcache", f"http://127.0.0.1:{port}",
                         CircuitBreaker("lmcache", 5, 10, 2))
    body = b'{"tokens":[' + b",".join(b"%d" % i for i in range(256)) + b"]}"
    for _ in range(n):
        await helper.post("/lookup", body, 2.0)
    helper.close()


def _count(addon: Path, port: int, n: int, tmp: Path) -> int:
    out = tmp / f"cg-{n}.out"
    env = {**os.environ, "PYTHONPATH": str(addon)}
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, __file__, "--client", str(port), str(n)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError("no totals")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--addon", type=Path, default=ROOT / "addon")
    ap.add_argument("--calls", default="2000,6000")
    ap.add_argument("--client", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        asyncio.run(_calls(*args.client))
        return
    sys.path.insert(0, str(ROOT / "addon"))
    from kvgate.sim.ports import free_port, wait_port

    n1, n2 = (int(x) for x in args.calls.split(","))
    port = free_port()
    ctl = subprocess.Popen([sys.executable, "-m", "kvgate.sim.fast", "controller", "--port",
                            str(port)], stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        with tempfile.TemporaryDirectory() as tmp:
            a = _count(args.addon, port, n1, Path(tmp))
            b = _count(args.addon, port, n2, Path(tmp))
    finally:
        ctl.terminate()
        ctl.wait()
    print(f"{args.addon}: {(b - a) / (n2 - n1):,.0f} instructions per /lookup call "
          f"({n1} and {n2} calls)")


if __name__ == "__main__":
    main()
