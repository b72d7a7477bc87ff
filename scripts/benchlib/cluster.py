"""A simulated cluster for one benchmark run: the twin controller and one process per
engine, so engines share no interpreter with each other or with the client, and one can
be killed (``lose``) and started again empty (``restore``) like a real one."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "addon"))
from kvgate.sim.cli import engine_argv, gateway_config  # noqa: E402
from kvgate.sim.engine import EngineParams  # noqa: E402
from kvgate.sim.ports import free_ports, wait_port  # noqa: E402

PY = sys.executable


def _argv(params: EngineParams) -> list[str]:
    return engine_argv(argparse.Namespace(**dataclasses.asdict(params)))


class SimCluster:
    def __init__(self, params: list[EngineParams], log_dir: Path) -> None:
        self.params = params
        self.log_dir = log_dir
        *ports, self.controller_port = free_ports(len(params) + 1)
        self.ports = {f"vllm-{i + 1}": p for i, p in enumerate(ports)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
                    "PYTHONPATH": str(ROOT / "addon")}

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports.values()]

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def config(self) -> dict[str, Any]:
        return gateway_config(self.ports, self.controller_port)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        self.procs[name] = subprocess.Popen([PY, "-m", "kvgate.sim.cli", *argv], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _start_engine(self, index: int) -> None:
        eid = f"vllm-{index + 1}"
        self._spawn(eid, ["engine", "--id", eid, "--port", str(self.ports[eid]),
                          "--controller-url", self.controller_url,
                          *_argv(self.params[index])])

    def start(self) -> None:
        self._spawn("controller", ["controller", "--port", str(self.controller_port)])
        wait_port(self.controller_port, 30)
        for i in range(len(self.params)):
            self._start_engine(i)
        for port in self.ports.values():
            wait_port(port, 60)
        time.sleep(0.2)  # registration follows the listener

    def lose(self, index: int) -> None:
        """Kill the engine outright (SIGKILL): in-flight requests break, as on a crash."""
        proc = self.procs.pop(f"vllm-{index + 1}")
        proc.kill()
        proc.wait()

    def restore(self, index: int) -> None:
        """Start it again on its port, its cache empty (it registers anew)."""
        self._start_engine(index)
        wait_port(self.ports[f"vllm-{index + 1}"], 60)

    def reset(self) -> None:
        """Every engine empty and its counters zero, then the controller told so: the
        next run starts as on a fresh cluster, without new processes."""
        for url in self.urls:
            _post(url + "/_sim/reset")
        _post(self.controller_url + "/_twin/reset")

    def busy_seconds(self) -> dict[str, float]:
        """Model seconds each engine spent prefilling and decoding (its /metrics)."""
        out = {}
        for eid, port in self.ports.items():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as r:  # noqa: S310 (loopback)
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("kvgate_sim:busy_seconds_total"):
                    out[eid] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.clear()


def _post(url: str) -> None:
    req = urllib.request.Request(url, data=b"{}", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 (loopback)
        r.read()


def engine_params(params: dict[str, Any], per_engine: dict[int, dict[str, Any]],
                  n: int) -> list[EngineParams]:
    return [EngineParams(**{**params, **per_engine.get(i, {})}) for i in range(n)]
