"""What the real-vLLM tier shares: the cluster (``scripts/vllm-cluster --control``), kvgate
in a real mitmdump in front of it, and readers for the engines', the controller's and the
gateway's own figures. Fixtures are in conftest.py (one cluster for the whole tier).

Only kvgate's public surface is used: its YAML config, the reverse-proxy port, the debug
headers, the admin port's Prometheus text and the flows it writes with ``-w``.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from kvgate.sim.ports import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "vllm-cluster"
INSTALLED = ROOT / ".venv-vllm" / ".kvgate-vllm"
ADDON = ROOT / "addon" / "kvcache.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
OPENAI_PY = ROOT / ".venv-openai" / "bin" / "python"
READY = "[vllm-cluster] ready "
START_TIMEOUT = 600.0
LMCACHE_CHUNK = 256
VLLM_BLOCK = 128

_TEXT = ("the cache engine routes a prompt to the model and the answer comes back from "
         "the server while a user asks a question about the policy in this document")


def text(tag: str, n_words: int = 800) -> str:
    """About 1.3 tokens a word with the tiny model's tokenizer; ``tag`` first, so prompts
    of different tags share no LMCache chunk."""
    rng, words = random.Random(tag), _TEXT.split()
    return tag + " " + " ".join(rng.choice(words) for _ in range(n_words))


# ------------------------------------------------------------------ the cluster

CONTROL = "[vllm-cluster] control "
UP = "[vllm-cluster] up "


@dataclass
class RealCluster:
    info: dict[str, Any]
    config: dict[str, Any]
    proc: subprocess.Popen[str]
    state: Path
    lines: list[str] = field(default_factory=list)
    out: queue.Queue[str | None] = field(default_factory=queue.Queue)
    """The cluster's stdout after its ready line: control answers, ``up`` lines."""

    @property
    def model(self) -> str:
        return self.info["model"]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.info["engines"]]

    def url(self, eid: str) -> str:
        return next(e["url"] for e in self.info["engines"] if e["id"] == eid)

    def port(self, eid: str) -> int:
        return next(e["port"] for e in self.info["engines"] if e["id"] == eid)

    @property
    def ctl(self) -> str:
        return self.info["controller"]["url"]

    def stderr(self) -> str:
        return (self.state / "cluster.stderr").read_text(errors="replace")

    def _next(self, prefix: str, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.out.get(timeout=max(0.05, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix.strip()!r} line in {timeout:.0f} s:\n"
                                     + self.stderr()[-3000:]) from None
            if line is None:
                raise AssertionError("vllm-cluster exited:\n" + self.stderr()[-3000:])
            self.lines.append(line)
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])

    def control(self, command: str, timeout: float = 60) -> dict[str, Any]:
        """``kill|stop|start ID`` through the cluster's --control stdin; its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._next(CONTROL, timeout)
        assert answer.get("ok"), (command, answer)
        return answer

    def wait_up(self, part: str, timeout: float = 300) -> dict[str, Any]:
        """Wait for the cluster's ``up`` line for a restarted part (an engine: healthy and
        registered with the controller)."""
        end = time.monotonic() + timeout
        while True:
            up = self._next(UP, max(0.1, end - time.monotonic()))
            if up["id"] == part:
                return up


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require_vllm_venv() -> None:
    if not INSTALLED.exists():
        if os.environ.get("CI"):
            pytest.fail("the vLLM venv is missing: run scripts/vllm-cluster --install-only")
        pytest.skip("run scripts/vllm-cluster --install-only first")


def run_cluster(state: Path) -> Iterator[RealCluster]:
    """``scripts/vllm-cluster --control`` with two engines, until its ready line; on exit
    SIGTERM it and check that it stopped everything (process groups, ports)."""
    require_vllm_venv()
    cfg_path = state / "kvgate.yaml"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with open(state / "cluster.stderr", "w") as err:
        proc = subprocess.Popen(
            [str(SCRIPT), "--engines", "2", "--state-dir", str(state / "state"),
             "--config-out", str(cfg_path), "--control"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
            cwd=ROOT)
    rc = RealCluster({}, {}, proc, state)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            rc.out.put(line)
        rc.out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        rc.info = rc._next(READY, START_TIMEOUT)
        rc.config = yaml.safe_load(cfg_path.read_text())
        yield rc
    finally:
        leaders = [e["pid"] for e in rc.info.get("engines", [])]
        leaders += [rc.info["controller"]["pid"]] if rc.info.get("controller") else []
        ports = [e["port"] for e in rc.info.get("engines", [])]
        ports += [rc.info["controller"]["port"]] if rc.info.get("controller") else []
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, rc.stderr()[-3000:]
        left = [pid for pid in leaders if _group_alive(pid)]
        assert not left, f"process groups still alive after SIGTERM: {left}"
        assert not [p for p in ports if _listening(p)], "ports still open after SIGTERM"


# ------------------------------------------------------------------ kvgate in mitmdump

@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    admin: int
    dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def flows(self) -> Path:
        return self.dir / "flows.mitm"

    def post(self, path: str, body: Any) -> requests.Response:
        # Connection: close, or requests leaves the connection open and mitmproxy, still
        # holding it at SIGINT, logs a CancelledError traceback on the way out
        return requests.post(self.url + path, json=body, timeout=120,
                             headers={"Connection": "close"})

    def log(self) -> str:
        return (self.dir / "mitmdump.log").read_text(errors="replace")

    def admin_metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        assert "Traceback" not in self.log(), self.log()[-3000:]


def start_gateway(where: Path, config: dict[str, Any], **options: str) -> Gateway:
    """mitmdump with the addon, reverse proxy on a free loopback port (like
    tests/integration/harness.py), its admin port on another; ``options`` are more
    mitmproxy ``--set`` options."""
    where.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(config))
    cfg["kvcache"]["metrics_port"] = admin = free_port()
    (where / "kvgate.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    args = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(port),
            "--mode", f"reverse:{cfg['kvcache']['vllm_endpoint']}",
            "-s", str(ADDON), "--set", f"kvcache_config={where / 'kvgate.yaml'}",
            "--set", f"confdir={where / 'mitmproxy'}", "--set", "termlog_verbosity=info",
            "-w", str(where / "flows.mitm")]
    for key, value in options.items():
        args += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with open(where / "mitmdump.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=where)
    gw = Gateway(proc, port, admin, where)
    wait_port(port)
    end = time.monotonic() + 15
    while "[kvcache] config" not in gw.log() and time.monotonic() < end:
        assert proc.poll() is None, gw.log()
        time.sleep(0.05)
    return gw


def gateway_config(cluster: RealCluster, **kv: Any) -> dict[str, Any]:
    """The config vllm-cluster printed, with a request-path budget that a busy 2-core
    machine meets (tokenize on a miss + /lookup)."""
    cfg = json.loads(json.dumps(cluster.config))
    cfg["kvcache"]["lookup_routing_timeout"] = "5s"
    cfg["kvcache"].update(kv)
    return cfg


# ------------------------------------------------------------------ engines and controller

def post(url: str, body: Any, timeout: float = 120) -> requests.Response:
    return requests.post(url, json=body, timeout=timeout)


def tokens_of(cluster: RealCluster, body: dict[str, Any]) -> list[int]:
    r = post(cluster.url(cluster.ids[0]) + "/tokenize", {"model": cluster.model, **body})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def lookup(cluster: RealCluster, tokens: list[int]) -> dict[str, Any]:
    r = post(cluster.ctl + "/lookup", {"tokens": tokens}, 10)
    assert r.status_code == 200, r.text
    return r.json()["layout_info"]


def wait_holder(cluster: RealCluster, tokens: list[int], eid: str, timeout: float = 30) -> int:
    """Wait until the controller says ``eid`` holds a prefix of ``tokens``; its length."""
    end = time.monotonic() + timeout
    layout: dict[str, Any] = {}
    while time.monotonic() < end:
        layout = lookup(cluster, tokens)
        if eid in layout and layout[eid][1] > 0:
            return layout[eid][1]
        time.sleep(0.2)
    raise AssertionError(f"controller never reported {eid} holding the tokens: {layout}")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def samples(metrics_text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(_LABEL.findall(labels or "")), float(value))
            for n, labels, value in _SAMPLE.findall(metrics_text) if n == name]


def engine_metrics(cluster: RealCluster, eid: str) -> str:
    r = requests.get(cluster.url(eid) + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def counter(cluster: RealCluster, eid: str, name: str, **labels: str) -> float:
    found = [v for lab, v in samples(engine_metrics(cluster, eid), name)
             if all(lab.get(k) == want for k, want in labels.items())]
    assert found, f"{name}{labels} not in {eid}'s /metrics"
    return sum(found)


def wait_counter(cluster: RealCluster, eid: str, name: str, above: float, timeout: float = 10,
                 **labels: str) -> float:
    """vLLM's frontend updates its counters just after the answer: poll a little."""
    end = time.monotonic() + timeout
    value = counter(cluster, eid, name, **labels)
    while value <= above and time.monotonic() < end:
        time.sleep(0.1)
        value = counter(cluster, eid, name, **labels)
    return value


def prompt_totals(cluster: RealCluster) -> dict[str, float]:
    return {eid: counter(cluster, eid, "vllm:prompt_tokens_total") for eid in cluster.ids}


def served_by(cluster: RealCluster, before: dict[str, float], prompt_tokens: int) -> str:
    """Which engine's own prompt-token counter grew by this request's prompt: the engine
    that really served it (not just the one kvgate's header names)."""
    end = time.monotonic() + 10
    while True:
        now = prompt_totals(cluster)
        grew = [eid for eid in cluster.ids if now[eid] - before[eid] == prompt_tokens]
        if len(grew) == 1 or time.monotonic() > end:
            assert len(grew) == 1, (before, now, prompt_tokens)
            return grew[0]
        time.sleep(0.1)


def reset_prefix_cache(cluster: RealCluster, eid: str) -> None:
    r = requests.post(cluster.url(eid) + "/reset_prefix_cache", timeout=30)
    assert r.status_code == 200, f"reset_prefix_cache: {r.status_code} (VLLM_SERVER_DEV_MODE?)"


def chat(cluster: RealCluster, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"model": cluster.model, "messages": messages, "max_tokens": 8, "temperature": 0,
            **kw}


def completion(cluster: RealCluster, prompt: Any, **kw: Any) -> dict[str, Any]:
    return {"model": cluster.model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}


# ------------------------------------------------------------------ a window on the controller

class ControllerTap:
    """A pass-through HTTP proxy in front of the real controller that keeps a copy of each
    exchange (path, request, status, answer): kvgate's LMCache client is pointed at it, so
    a test sees what the real controller answered kvgate (``num_tokens`` of a /pin is the
    real worker's count). Nothing is altered or made up on the way."""

    def __init__(self, upstream: str) -> None:
        import http.server

        self.upstream = upstream.rstrip("/")
        self.seen: list[tuple[str, Any, int, Any]] = []
        self._lock = threading.Lock()
        tap = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    r = requests.post(tap.upstream + self.path, data=raw, timeout=30,
                                      headers={"content-type": "application/json"})
                    status, answer = r.status_code, r.content
                except requests.RequestException:
                    self.send_error(502)
                    return
                with tap._lock:
                    tap.seen.append((self.path, _json_or(raw), status, _json_or(answer)))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def calls(self, path: str) -> list[tuple[Any, int, Any]]:
        with self._lock:
            return [(req, status, ans) for p, req, status, ans in self.seen if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _json_or(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def admin_samples(gw: Gateway, name: str) -> list[tuple[dict[str, str], float]]:
    return samples(gw.admin_metrics(), name)


def actions(gw: Gateway) -> dict[tuple[str, str], float]:
    """kvgate's ``kvgate_strategy_actions_total`` by (action, result)."""
    return {(lab["action"], lab["result"]): v
            for lab, v in admin_samples(gw, "kvgate_strategy_actions_total")}


def endpoint_healthy(gw: Gateway) -> dict[str, float]:
    return {lab["endpoint"]: v for lab, v in admin_samples(gw, "kvgate_endpoint_healthy")}
