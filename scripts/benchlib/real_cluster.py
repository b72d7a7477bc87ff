"""Two real vLLM (CPU) engines with LMCache and the real controller, for ``scripts/bench
--real``: what ``SimCluster`` offers the benchmark, on the stack ``scripts/vllm-cluster``
starts (the tiny model; docs/real-vllm.md).

Each engine's KV and LMCache tier are kept small (as in ``scripts/demo --real``), so that
where a prompt goes decides what is cached. ``reset`` empties both tiers of every engine
and waits until the controller has heard of it. Engines cannot be lost and restored here,
and their model TTFT and busy time are not reported: imbalance is counted in requests.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .cluster import ROOT

READY = "[vllm-cluster] ready "
KV_BLOCKS = 150  # 19,200 tokens of vLLM KV per engine
LMCACHE_GB = 0.009  # and about as much in LMCache's CPU tier


def attached_info(config: Path) -> dict[str, Any]:
    """A running ``scripts/vllm-cluster`` as its ready line describes it, read from the
    kvgate config it wrote (``--config-out``): for ``--attach``. Its caches are its own
    size, not the small ones this module starts with."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    kv = cfg["kvcache"]
    engines = [{"id": e["id"], "core": "?",
                "url": f"http://{e['socket_address']['address']}:{e['socket_address']['port']}"}
               for c in cfg["clusters"] for e in c["endpoints"]]
    return {"model": kv["default_model"], "engines": engines, "seconds": 0.0,
            "controller": {"url": kv["lmcache_endpoint"]}, "config": cfg}


def _post(url: str, body: Any = None, timeout: float = 60) -> Any:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (loopback)
        text = r.read()
    return json.loads(text) if text else None


class RealCluster:
    def __init__(self, engines: int, log_dir: Path, attach: Path | None = None) -> None:
        self.n = engines
        self.log_dir = log_dir
        self.attach = attach
        self.info: dict[str, Any] = {}
        self.proc: subprocess.Popen[str] | None = None
        self._seen: dict[str, float] = {}

    @property
    def urls(self) -> list[str]:
        return [e["url"] for e in self.info["engines"]]

    @property
    def model(self) -> str:
        return str(self.info["model"])

    def config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.info["config"]))  # a copy the caller may change

    def start(self) -> None:
        if self.attach is not None:  # a cluster someone else started and will stop
            self.info = attached_info(self.attach)
            return
        state = self.log_dir / "vllm-cluster"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        err = open(self.log_dir / "vllm-cluster.log", "w")  # noqa: SIM115 (the child's)
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "vllm-cluster"), "--engines", str(self.n), "--state-dir",
             str(state), "--config-out", str(self.log_dir / "kvgate-real.yaml"),
             "--kv-blocks", str(KV_BLOCKS), "--lmcache-cpu-gb", str(LMCACHE_GB)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
        err.close()
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        end = time.monotonic() + 900
        while time.monotonic() < end:
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"vllm-cluster exited: see {self.log_dir}/vllm-cluster.log")
            if line.startswith(READY):
                import yaml

                self.info = json.loads(line[len(READY):])
                self.info["config"] = yaml.safe_load(
                    (self.log_dir / "kvgate-real.yaml").read_text())
                return
        raise TimeoutError("vllm-cluster not ready in 15 minutes")

    def reset(self) -> None:
        """Both tiers of every engine emptied, and the controller's view with them."""
        ctl = self.info["controller"]["url"]
        for e in self.info["engines"]:
            _post(e["url"] + "/reset_prefix_cache")
            _post(ctl + "/clear", {"instance_id": e["id"], "location": "LocalCPUBackend"})
        time.sleep(1.0)  # the workers' evictions reach the controller in batches
        self._seen = self._requests()

    def _requests(self) -> dict[str, float]:
        out = {}
        for e in self.info["engines"]:
            with urllib.request.urlopen(e["url"] + "/metrics", timeout=10) as r:  # noqa: S310
                text = r.read().decode()
            out[e["id"]] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                               if line.startswith("vllm:request_success_total"))
        return out

    def busy_seconds(self) -> dict[str, float]:
        """Requests each engine finished since the reset (no busy time from real vLLM)."""
        now = self._requests()
        return {k: now[k] - self._seen.get(k, 0.0) for k in now}

    def lose(self, index: int) -> None:
        raise NotImplementedError("engines are not lost and restored in --real runs")

    restore = lose

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
