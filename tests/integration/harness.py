"""Helpers for the integration tests: free ports, stub fleets, a real mitmdump subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from kvgate.sim.ports import free_port, wait_port  # noqa: F401  (re-exported)
from kvgate.sim.stub import StubController, StubEngine

ROOT = Path(__file__).resolve().parents[2]
ADDON = ROOT / "addon" / "kvcache.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"



@dataclass
class Stubs:
    controller: StubController
    controller_port: int
    engines: dict[str, StubEngine]
    ports: dict[str, int]

    def kvgate_config(self, **kv: Any) -> dict[str, Any]:
        first = next(iter(self.ports.values()))
        base: dict[str, Any] = {
            "vllm_endpoint": f"http://127.0.0.1:{first}",
            "lmcache_endpoint": f"http://127.0.0.1:{self.controller_port}",
            "debug_headers": True,
            "lookup_routing_timeout": "500ms",
        }
        base.update(kv)
        return {
            "kvcache": base,
            "clusters": [{
                "name": "vllm",
                "endpoints": [
                    {"id": eid, "socket_address": {"address": "127.0.0.1", "port": port}}
                    for eid, port in self.ports.items()
                ],
            }],
        }

    def calls(self, engine_id: str) -> list[tuple[str, str, Any]]:
        with self.engines[engine_id].lock:
            return list(self.engines[engine_id].calls)

    def controller_calls(self, path: str | None = None) -> list[Any]:
        with self.controller.lock:
            return [b for _, p, b in self.controller.calls if path is None or p == path]


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    log_path: Path
    flows_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return requests.post(self.url + path, data=data, timeout=10, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_mitmdump(tmp_path: Path, config: dict[str, Any] | str, *, mode: str | None,
                   verbosity: str = "info", wait: bool = True) -> Gateway:
    cfg_path = tmp_path / f"kvgate-{time.monotonic_ns()}.yaml"
    cfg_path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / f"mitmdump-{port}.log"
    flows_path = tmp_path / f"flows-{port}.mitm"
    args = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(port),
            "-s", str(ADDON), "--set", f"kvcache_config={cfg_path}",
            "--set", f"termlog_verbosity={verbosity}", "-w", str(flows_path)]
    if mode:
        args += ["--mode", mode]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=tmp_path)
    gw = Gateway(proc, port, log_path, flows_path)
    if wait:
        wait_port(port)
        # the script loads right after the listener opens; wait for its config line
        end = time.monotonic() + 15
        while "[kvcache] config" not in gw.log() and time.monotonic() < end:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    return gw


