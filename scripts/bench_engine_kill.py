"""Client errors when one of 3 engines is SIGKILLed with requests in flight (issue 11).

Starts 3 stub engines (``kvgate.sim.stub``, each answer delayed so requests are in flight)
and a stub controller as their own processes, and mitmdump + kvgate (defaults: health
checks every 500 ms) in front. 16 keep-alive clients post for --seconds; after --kill-at
seconds engine vllm-2 gets SIGKILL. Counts the answers that were not 200 (and connection
errors), those of requests sent after the kill (which never reached the killed engine:
avoidable), and the log lines about the killed engine's ejection.
``--addon DIR`` loads another checkout's ``addon`` (e.g. the previous commit's, from
``git archive HEAD | tar -x -C /tmp/old``) for the before figure.

  .venv/bin/python scripts/bench_engine_kill.py [--addon DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
from kvgate.sim.ports import free_port, wait_port  # noqa: E402

BIN = Path(sys.executable).parent


def _start(args: list[str], env: dict[str, str] | None = None,
           out: object = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.Popen(args, env={**base, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)


def one_run(addon: Path, seconds: float, kill_at: float, delay: float, clients: int,
            tmp: Path) -> dict[str, object]:
    ports = {f"vllm-{i}": free_port() for i in (1, 2, 3)}
    ctl = free_port()
    procs = {eid: _start([sys.executable, "-m", "kvgate.sim.stub", "engine", "--port",
                          str(p), "--id", eid]) for eid, p in ports.items()}
    procs["ctl"] = _start([sys.executable, "-m", "kvgate.sim.stub", "controller", "--port",
                           str(ctl)])
    gw_port = free_port()
    log_path = tmp / f"mitmdump-{gw_port}.log"
    try:
        for p in (*ports.values(), ctl):
            wait_port(p)
        for p in ports.values():
            requests.post(f"http://127.0.0.1:{p}/_stub/config", json={"delay": delay},
                          timeout=5)
        cfg = {"kvcache": {"vllm_endpoint": f"http://127.0.0.1:{ports['vllm-1']}",
                           "lmcache_endpoint": f"http://127.0.0.1:{ctl}",
                           "debug_headers": True},
               "clusters": [{"name": "c", "endpoints": [
                   {"id": eid, "socket_address": {"address": "127.0.0.1", "port": p}}
                   for eid, p in ports.items()]}]}
        cfg_path = tmp / f"kvgate-{gw_port}.json"
        cfg_path.write_text(json.dumps(cfg))
        with open(log_path, "w") as log:
            procs["mitmdump"] = _start(
                [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "-p", str(gw_port),
                 "--mode", f"reverse:http://127.0.0.1:{ports['vllm-1']}",
                 "-s", str(addon / "kvcache.py"), "--set", f"kvcache_config={cfg_path}"],
                {"PYTHONPATH": str(addon)}, out=log)
        wait_port(gw_port, 60)
        time.sleep(1.5)
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()
        end = time.monotonic() + seconds
        kill_time = [float("inf")]  # requests started after it could not have been sent
        late_errors = [0]  # to the killed engine before it died: their errors are avoidable

        def client(k: int) -> None:
            s = requests.Session()
            i = 0
            while time.monotonic() < end:
                body = {"model": "m", "prompt": f"client {k} request {i} " + "word " * 50}
                i += 1
                started = time.monotonic()
                try:
                    r = s.post(f"http://127.0.0.1:{gw_port}/v1/completions", json=body,
                               timeout=30)
                    what = str(r.status_code)
                except requests.RequestException as exc:
                    what = type(exc).__name__
                with lock:
                    outcomes[what] += 1
                    if what != "200" and started > kill_time[0]:
                        late_errors[0] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        time.sleep(kill_at)
        procs["vllm-2"].send_signal(signal.SIGKILL)
        killed_at = kill_time[0] = time.monotonic()
        for t in threads:
            t.join()
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines()
                 if "vllm-2" in ln and ("ejected" in ln or "failed its health" in ln)]
        return {"outcomes": dict(outcomes), "errors": sum(v for k, v in outcomes.items()
                                                          if k != "200"),
                "total": sum(outcomes.values()), "ejection_lines": len(lines),
                "started_after_kill": late_errors[0],
                "after_kill_s": round(time.monotonic() - killed_at, 1)}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p is procs.get("mitmdump") else signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--addon", type=Path, default=ROOT / "addon")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--kill-at", type=float, default=2.0)
    ap.add_argument("--delay", type=float, default=0.3, help="each engine answer, seconds")
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.runs):
            res = one_run(args.addon, args.seconds, args.kill_at, args.delay, args.clients,
                          Path(tmp))
            print(f"{args.addon} run {n + 1}: {res['errors']} client errors of "
                  f"{res['total']} requests {res['outcomes']}, of them "
                  f"{res['started_after_kill']} sent after the kill; ejection lines for the "
                  f"killed engine: {res['ejection_lines']}", flush=True)


if __name__ == "__main__":
    main()
