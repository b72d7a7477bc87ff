"""A real vLLM cluster on a CPU-only machine: N engines, the LMCache controller, LMCache in
each engine reporting to it. Run through ``scripts/vllm-cluster`` (which installs
``.venv-vllm`` first); this module runs under that venv.

A TEST HARNESS. LMCache runs inside CPU vLLM only through ``vllmcpu.lmcache_cpu_connector``,
our connector tied to lmcache 0.5.6 internals (not a supported LMCache path); on GPUs stock
LMCache is used.

What it does:
- builds the tiny seeded model (``vllmcpu.tiny_model``) into ``--model-dir`` (a no-op when
  it is there already); nothing is ever downloaded: offline flags are set for every child;
- starts the LMCache controller (unless ``--no-lmcache``) and ``--engines`` vLLM OpenAI
  servers, engine i's compute threads pinned to core (i-1) mod cores
  (``VLLM_CPU_OMP_THREADS_BIND``; its HTTP front end is not pinned), LMCache instance id =
  engine id (``engine-1``, ``engine-2``, ...);
- prints the kvgate config that fits them (``--config-out`` also writes it), waits until
  every engine answers ``/health`` and (with LMCache) has registered with the controller,
  printing a progress line every few seconds, then prints one machine-readable line
  ``[vllm-cluster] ready {json}``;
- stops everything it started (each child is its own process group) on SIGINT, SIGTERM,
  SIGHUP, when its parent dies, or when a child dies. Children also get SIGTERM from the
  kernel if this process dies without cleaning up (PR_SET_PDEATHSIG).
- LMCache workers send the controller a heartbeat every ``--heartbeat`` seconds, on the
  controller's heartbeat port: a restarted controller learns from it that a worker exists,
  registers it and asks it for a full sync of what it holds (lmcache 0.5.6 registers a
  worker only once, at start, and otherwise forgets it across a controller restart). A
  worker stores nothing while it syncs ("freeze mode"), so the sync is made short (no
  random start delay up to 5 s, status polled every 0.2 s, not 5 s) and "healthy" waits
  for the one every worker makes when the controller starts.
- with ``--control``, it reads commands on stdin, one a line, so a test can fail one part
  and bring it back: ``kill ID`` (SIGKILL its process group), ``stop ID`` (SIGTERM, wait),
  ``start ID`` (the same command line: same port, same instance id); ID is an engine id or
  ``controller``. Each is answered by one ``[vllm-cluster] control {json}`` line on stdout,
  and a restarted part by ``[vllm-cluster] up {json}`` once it is healthy (an engine:
  ``/health`` answers and it is registered with the controller). A part stopped this way
  is not a failure; any other death still stops the cluster.

Every socket is on 127.0.0.1 and every temp file under ``--state-dir``: ``run/`` (logs,
TMPDIR, Prometheus and RPC files; wiped at start) and ``cache/`` (vLLM / torch compile
caches, kept between runs). A state dir too deep for unix socket paths is reached through
a short link in /tmp, removed at exit (``socket_dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "[vllm-cluster]"
MARKER = ".vllm-cluster-state"
PR_SET_PDEATHSIG = 1
CONNECTOR_CLASS = "LMCacheCPUConnectorV1"
# lmcache 0.5.6's log lines for a full sync (this harness is tied to that release): the
# controller asks every worker for one when it starts; the worker stores nothing while it
# is frozen for it, so nothing served in that window ever reaches the controller
SYNC_DONE = "Full sync completion threshold reached"  # controller: enough workers synced
FREEZE_IN = "Entering freeze mode for full sync"  # worker: stores paused
FREEZE_OUT = "Exiting freeze mode after full sync"  # worker: stores resume
CONNECTOR_MODULE = "vllmcpu.lmcache_cpu_connector"


def say(msg: str) -> None:
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------ processes

_libc: Any = None


def _prctl_pdeathsig(sig: int = signal.SIGTERM) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _child_setup() -> None:
    """In the child, before exec: die with us; own process group (set by start_new_session)."""
    _prctl_pdeathsig(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=str(ROOT), start_new_session=True,
                                         preexec_fn=_child_setup)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def group_alive(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def stop_all(children: list[Child], grace: float = 10.0) -> None:
    """SIGTERM every process group, wait for them, SIGKILL what is left."""
    live = [c for c in children if c.group_alive()]
    if not live:
        return
    t0 = time.monotonic()
    say("stopping " + ", ".join(f"{c.name} (pid {c.pid})" for c in live))
    for c in live:
        c.signal_group(signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        for c in live:
            if c.proc is not None:
                c.proc.poll()  # reap the leader so its group can vanish
        live = [c for c in live if c.group_alive()]
        if not live:
            break
        time.sleep(0.2)
    for c in live:
        say(f"{c.name} did not stop in {grace:.0f} s: SIGKILL")
        c.signal_group(signal.SIGKILL)
    for c in children:
        if c.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(5)
    say(f"stopped in {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------ ports and HTTP

def free_ports(n: int, avoid: set[int]) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            p = s.getsockname()[1]
            if p not in avoid and p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def listening(port: int) -> bool:
    """Whether something still listens on the port. SO_REUSEADDR, as the servers set it:
    connections the dead process left in TIME_WAIT do not stop a restart binding."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_port_free(port: int, timeout: float = 10.0) -> bool:
    """A killed process's listener can linger a moment; a restart must not race it."""
    end = time.monotonic() + timeout
    while listening(port):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def http(method: str, url: str, body: Any = None, timeout: float = 2.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


# ------------------------------------------------------------------ the cluster

@dataclass
class Engine:
    id: str
    port: int
    core: int
    worker_port: int
    child: Child | None = None
    healthy: bool = False
    registered: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    args: argparse.Namespace
    state: Path
    model_dir: Path
    engines: list[Engine] = field(default_factory=list)
    controller: Child | None = None
    ctl_ports: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    syncs_before: dict[str, int] = field(default_factory=dict)  # at a controller restart
    sockets: Path | None = None  # state/run, or a short link to it (see socket_dir)

    @property
    def run(self) -> Path:
        """Where the children's temp files and sockets go, as they spell it."""
        return self.sockets or self.state / "run"

    @property
    def children(self) -> list[Child]:
        out = [e.child for e in self.engines if e.child is not None]
        return out + ([self.controller] if self.controller else [])

    def base_env(self, tmp: Path) -> dict[str, str]:
        cache = self.state / "cache"
        env = {k: v for k, v in os.environ.items()
               if "proxy" not in k.lower() and not k.startswith(("LMCACHE_", "VLLM_"))}
        env.update({
            "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                          if env.get("PYTHONPATH") else [])),
            "PYTHONHASHSEED": "0",
            "PYTHONUNBUFFERED": "1",
            # offline: no model hub, no telemetry
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
            "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
            "LMCACHE_TRACK_USAGE": "false",
            # every file under the state dir
            "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp),
            "HF_HOME": str(cache / "hf"), "XDG_CACHE_HOME": str(cache / "xdg"),
            "XDG_CONFIG_HOME": str(cache / "xdg-config"),
            "VLLM_CACHE_ROOT": str(cache / "vllm"), "VLLM_CONFIG_ROOT": str(cache / "vllm-config"),
            "VLLM_ASSETS_CACHE": str(cache / "vllm" / "assets"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_CACHE_DIR": str(cache / "triton"),
            "NUMBA_CACHE_DIR": str(cache / "numba"),
            "TORCH_HOME": str(cache / "torch"),
            "MPLCONFIGDIR": str(cache / "matplotlib"),
            "OUTLINES_CACHE_DIR": str(cache / "outlines"),
            # loopback only
            "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
            "TOKENIZERS_PARALLELISM": "false",
        })
        return env

    # ---- controller

    def controller_child(self) -> Child:
        run = self.run / "controller"
        tmp = run / "tmp"
        prom = run / "prometheus"
        for d in (tmp, prom):
            d.mkdir(parents=True, exist_ok=True)
        env = self.base_env(tmp)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
        p = self.ctl_ports
        args = [sys.executable, "-m", "lmcache.v1.api_server", "--host", "127.0.0.1",
                "--port", str(p["http"]), "--monitor-ports",
                json.dumps({"pull": p["pull"], "reply": p["reply"],
                            "heartbeat": p["heartbeat"]})]
        return Child("controller", args, env, self.state / "run" / "controller.log")

    # ---- engines

    def engine_child(self, e: Engine) -> Child:
        a = self.args
        run = self.run / e.id
        tmp = run / "tmp"
        prom = run / "prometheus"
        for d in (tmp, prom):
            d.mkdir(parents=True, exist_ok=True)
        env = self.base_env(tmp)
        env.update({
            # LMCache's metrics folder (set in the engine's LMCache processes only, by our
            # connector: PROMETHEUS_MULTIPROC_DIR here would change vLLM's own /metrics)
            "VLLMCPU_LMCACHE_PROMETHEUS_DIR": str(prom),
            "VLLM_RPC_BASE_PATH": str(tmp),
            "VLLM_CPU_KVCACHE_SPACE": str(a.kv_space_gb),
            "VLLM_CPU_OMP_THREADS_BIND": str(e.core),
            "VLLM_SERVER_DEV_MODE": "1" if a.dev_mode else "0",
            "VLLM_LOGGING_LEVEL": a.log_level,
        })
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", a.model_name,
                "--host", "127.0.0.1", "--port", str(e.port),
                "--max-model-len", str(a.max_model_len), "--seed", "0",
                "--enable-prefix-caching", "--enable-prompt-tokens-details",
                "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"]
        if not a.compile:
            args.append("--enforce-eager")
        if a.kv_blocks:
            args += ["--num-gpu-blocks-override", str(a.kv_blocks)]
        if a.lmcache:
            p = self.ctl_ports
            env.update({
                "LMCACHE_CHUNK_SIZE": "256",
                "LMCACHE_LOCAL_CPU": "True",
                "LMCACHE_MAX_LOCAL_CPU_SIZE": str(a.lmcache_cpu_gb),
                "LMCACHE_ENABLE_CONTROLLER": "True",
                "LMCACHE_LMCACHE_INSTANCE_ID": e.id,
                "LMCACHE_CONTROLLER_PULL_URL": f"127.0.0.1:{p['pull']}",
                "LMCACHE_CONTROLLER_REPLY_URL": f"127.0.0.1:{p['reply']}",
                "LMCACHE_LMCACHE_WORKER_PORTS": str(e.worker_port),
                # heartbeats (to the port the controller names when the worker registers)
                # are how a restarted controller finds its workers again
                "LMCACHE_LMCACHE_WORKER_HEARTBEAT_TIME": str(a.heartbeat),
                "LMCACHE_LMCACHE_WORKER_HEARTBEAT_DELAY_TIME": str(a.heartbeat),
                # a full sync freezes the worker's stores until it is over: keep it short;
                # a controller gone mid-request: give up on the socket after 5 s, not 30
                "LMCACHE_EXTRA_CONFIG": json.dumps({
                    "full_sync_startup_delay_s": 0.2, "full_sync_status_poll_interval_s": 0.2,
                    "worker_socket_recv_timeout_ms": 5000,
                    "worker_socket_send_timeout_ms": 2000}),
                "LMCACHE_INTERNAL_API_SERVER_ENABLED": "False",
                "LMCACHE_LOG_LEVEL": a.log_level,
            })
            args += ["--kv-transfer-config", json.dumps({
                "kv_connector": CONNECTOR_CLASS, "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_both"})]
        return Child(e.id, args, env, self.state / "run" / f"{e.id}.log")

    # ---- config and readiness

    def kvgate_config(self) -> dict[str, Any]:
        a = self.args
        kv: dict[str, Any] = {
            "enabled": bool(a.lmcache),
            "vllm_endpoint": self.engines[0].url,
            "lmcache_endpoint": (f"http://127.0.0.1:{self.ctl_ports['http']}" if a.lmcache
                                 else ""),
            "default_model": a.model_name,
            "debug_headers": True,
            "lookup_routing_timeout": "500ms",
            "tokenizers": {a.model_name: str(self.model_dir)},
        }
        if not a.lmcache:
            del kv["lmcache_endpoint"]
        return {
            "kvcache": kv,
            "clusters": [{
                "name": "vllm",
                "endpoints": [{"id": e.id, "socket_address": {"address": "127.0.0.1",
                                                              "port": e.port}}
                              for e in self.engines],
            }],
            "routes": [{"prefix": "/", "cluster": "vllm"}],
        }

    def synced(self) -> bool:
        """The controller's start-up full sync is over and no worker is frozen for one."""
        if not self.args.lmcache:
            return True
        if self.controller is None or SYNC_DONE not in _read(self.controller.log):
            return False
        for e in self.engines:
            text = _read(e.child.log) if e.child else ""
            if text.count(FREEZE_IN) > text.count(FREEZE_OUT):
                return False
        return True

    def controller_up(self) -> bool:
        status, _ = http("POST", f"http://127.0.0.1:{self.ctl_ports['http']}/lookup",
                         {"tokens": [1]})
        return status == 200

    def registered(self, e: Engine) -> bool:
        status, body = http("POST", f"http://127.0.0.1:{self.ctl_ports['http']}/query_worker_info",
                            {"instance_id": e.id})
        if status != 200 or not isinstance(body, dict):
            return False
        return any(w.get("instance_id") == e.id for w in body.get("worker_infos") or [])

    def ready_info(self, seconds: float, config_path: Path | None) -> dict[str, Any]:
        a = self.args
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "seconds": round(seconds, 1),
            "model": a.model_name,
            "model_dir": str(self.model_dir),
            "state_dir": str(self.state),
            "lmcache": bool(a.lmcache),
            "config_path": str(config_path) if config_path else None,
            "engines": [{"id": e.id, "url": e.url, "port": e.port, "core": e.core,
                         "pid": e.child.pid if e.child else 0,
                         "worker_port": e.worker_port if a.lmcache else None,
                         "log": str(e.child.log) if e.child else None}
                        for e in self.engines],
            "controller": None,
        }
        if a.lmcache and self.controller:
            p = self.ctl_ports
            info["controller"] = {"url": f"http://127.0.0.1:{p['http']}", "port": p["http"],
                                  "pull": p["pull"], "reply": p["reply"],
                                  "heartbeat": p["heartbeat"],
                                  "pid": self.controller.pid, "log": str(self.controller.log)}
        return info

    # ---- control (--control): fail one part, bring it back

    def part(self, name: str) -> tuple[Child | None, Engine | None]:
        if name == "controller":
            return self.controller, None
        e = next((e for e in self.engines if e.id == name), None)
        return (e.child if e else None), e

    def control(self, line: str, down: set[str], coming: dict[str, float]) -> dict[str, Any]:
        """Run one ``kill|stop|start ID`` command; ``down`` holds what was stopped on
        purpose, ``coming`` what was restarted and is not healthy yet (with its start)."""
        words = line.split()
        if len(words) != 2 or words[0] not in ("kill", "stop", "start"):
            return {"ok": False, "error": "usage: kill|stop|start ID", "line": line}
        cmd, name = words
        child, engine = self.part(name)
        out: dict[str, Any] = {"cmd": cmd, "id": name}
        if child is None:
            return {**out, "ok": False, "error": f"no part {name!r}"}
        if cmd in ("kill", "stop"):
            down.add(name)
            coming.pop(name, None)
            if cmd == "kill":
                child.signal_group(signal.SIGKILL)
                if child.proc is not None:
                    child.proc.wait()
                end = time.monotonic() + 10  # its other processes go a moment later
                while child.group_alive() and time.monotonic() < end:
                    time.sleep(0.05)
            else:
                stop_all([child])
            return {**out, "ok": True, "pid": child.pid, "alive": child.group_alive()}
        if child.group_alive():
            return {**out, "ok": False, "error": f"{name} is running"}
        ports = [engine.port, engine.worker_port] if engine else list(self.ctl_ports.values())
        busy = [p for p in ports if not wait_port_free(p)]
        if busy:
            return {**out, "ok": False, "error": f"ports still in use: {busy}"}
        if engine is not None:
            engine.healthy = engine.registered = False
        else:  # every worker must sync again with the new controller
            self.syncs_before = {e.id: _read(e.child.log).count(FREEZE_OUT)
                                 for e in self.engines if e.child}
        # a log per life: the first one's last lines stay readable
        self.restarts[name] = self.restarts.get(name, 0) + 1
        child.log = self.state / "run" / f"{name}.restart{self.restarts[name]}.log"
        child.start()
        down.discard(name)
        coming[name] = time.monotonic()
        return {**out, "ok": True, "pid": child.pid, "log": str(child.log)}

    def controller_waits(self) -> list[str]:
        """What a restarted controller still waits for; empty once it answers and every
        worker has re-registered (on its next heartbeat) and sent it a full sync."""
        if not self.controller_up():
            return ["not answering"]
        waits = []
        for e in self.engines:
            if not self.registered(e):
                waits.append(f"{e.id} not registered")
            elif e.child and (_read(e.child.log).count(FREEZE_OUT)
                              <= self.syncs_before.get(e.id, -1)):
                waits.append(f"{e.id} not synced")
        if not waits and not self.synced():
            waits.append("first full sync running")
        return waits

    def pending(self, name: str) -> str:
        """What a restarted part still waits for, for the progress line."""
        _, engine = self.part(name)
        if engine is None:
            return "; ".join(self.controller_waits())
        return ("not healthy" if not engine.healthy else
                "not registered" if self.args.lmcache and not engine.registered else
                "frozen for a sync")

    def came_up(self, name: str) -> bool:
        """A restarted controller: nothing left in ``controller_waits``. A restarted
        engine: healthy, registered, not frozen for a sync."""
        child, engine = self.part(name)
        if engine is None:
            return not self.controller_waits()
        if not engine.healthy:
            engine.healthy = http("GET", engine.url + "/health", timeout=1.0)[0] == 200
        if engine.healthy and self.args.lmcache and not engine.registered:
            engine.registered = self.registered(engine)
        if not (engine.healthy and (engine.registered or not self.args.lmcache)):
            return False
        text = _read(child.log) if child else ""
        return text.count(FREEZE_IN) <= text.count(FREEZE_OUT)


# ------------------------------------------------------------------ state dir

def claim_state_dir(state: Path) -> Any:
    """Lock the state dir for this run (one cluster per folder) and wipe its run/ part."""
    if state.exists() and any(state.iterdir()) and not (state / MARKER).exists():
        raise SystemExit(f"{PREFIX} {state} is not empty and not a vllm-cluster state dir; "
                         f"pick another --state-dir")
    state.mkdir(parents=True, exist_ok=True)
    (state / MARKER).write_text("state folder of scripts/vllm-cluster; safe to delete\n")
    lock = open(state / "lock", "w")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"{PREFIX} another vllm-cluster runs on {state}; use another "
                         f"--state-dir") from None
    shutil.rmtree(state / "run", ignore_errors=True)
    (state / "run").mkdir()
    return lock


SOCKET_PATH_ROOM = 48  # a unix socket path has 107 bytes; vLLM adds a folder and a uuid


def socket_dir(state: Path) -> Path | None:
    """vLLM binds ZMQ sockets under TMPDIR (``.../engine-1/tmp/<uuid>``), and a unix socket
    path may not exceed 107 bytes: a state dir deep in a pytest tmp folder does. Then the
    children see ``state/run`` through a short link in /tmp (the files stay in state/run;
    the link is removed at exit). None when the path is short enough as it is."""
    run = state / "run"
    if len(str(run)) <= SOCKET_PATH_ROOM:
        return None
    digest = hashlib.sha1(str(run).encode()).hexdigest()[:10]
    link = Path(tempfile.gettempdir()) / f"kvgate-vllm-{digest}"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(run, target_is_directory=True)
    return link


# ------------------------------------------------------------------ main

class Stop(Exception):
    pass


def _read_commands(out: queue.Queue[str]) -> None:
    """stdin lines to the main loop (which alone touches the children)."""
    for line in sys.stdin:
        if line.strip():
            out.put(line.strip())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/vllm-cluster",
        description="Real vLLM (CPU) engines + the LMCache controller + LMCache in each "
                    "engine, for kvgate's tests. A test harness (LMCache on the CPU through "
                    "vllmcpu's connector, tied to lmcache 0.5.6).")
    p.add_argument("--install-only", action="store_true",
                   help="install .venv-vllm and exit (handled by the shell wrapper)")
    p.add_argument("--engines", type=int, default=2, help="number of engines (default 2)")
    p.add_argument("--port", type=int, default=0,
                   help="first engine port (engine i: port+i-1); default: free ports")
    p.add_argument("--controller-port", type=int, default=0,
                   help="LMCache controller HTTP port; default: a free port")
    p.add_argument("--pull-port", type=int, default=0, help="controller ZMQ pull port")
    p.add_argument("--reply-port", type=int, default=0, help="controller ZMQ reply port")
    p.add_argument("--heartbeat-port", type=int, default=0,
                   help="controller ZMQ heartbeat port")
    p.add_argument("--heartbeat", type=int, default=1,
                   help="seconds between an LMCache worker's heartbeats (whole seconds)")
    p.add_argument("--control", action="store_true",
                   help="read kill|stop|start ID commands on stdin (for tests)")
    p.add_argument("--lmcache", dest="lmcache", action="store_true", default=True,
                   help="LMCache in each engine + the controller (the default)")
    p.add_argument("--no-lmcache", dest="lmcache", action="store_false",
                   help="plain vLLM engines, no controller")
    p.add_argument("--config-out", type=Path, default=None,
                   help="also write the kvgate config YAML here")
    p.add_argument("--state-dir", type=Path, default=ROOT / "out" / "vllm-cluster",
                   help="the one folder for logs and temp files (default out/vllm-cluster)")
    p.add_argument("--model-dir", type=Path, default=ROOT / "out" / "tiny-model",
                   help="where the tiny model is built (default out/tiny-model)")
    p.add_argument("--model-name", default="tiny-llama", help="served model name")
    p.add_argument("--cores", default="",
                   help="comma-separated cores, one per engine in turn (default 0..ncpu-1)")
    p.add_argument("--kv-space-gb", type=float, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--kv-blocks", type=int, default=0,
                   help="KV blocks (of 128 tokens) per engine, vLLM's "
                        "--num-gpu-blocks-override (default: what --kv-space-gb holds); "
                        "small, so that where a prompt was served matters")
    p.add_argument("--lmcache-cpu-gb", type=float, default=1,
                   help="LMCACHE_MAX_LOCAL_CPU_SIZE per engine")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (slower start) instead of --enforce-eager")
    p.add_argument("--no-dev-mode", dest="dev_mode", action="store_false", default=True,
                   help="do not set VLLM_SERVER_DEV_MODE=1 (which enables "
                        "POST /reset_prefix_cache)")
    p.add_argument("--log-level", default="INFO", help="vLLM and LMCache log level")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds to wait for health before giving up")
    p.add_argument("--progress-every", type=float, default=5.0, help="progress line period")
    a = p.parse_args(argv)
    if a.engines < 1:
        p.error("--engines must be >= 1")
    return a


def plan(cluster: Cluster) -> None:
    """Build the model if needed (in a child: torch stays out of this process), pick the
    ports and cores."""
    from vllmcpu import tiny_model

    a, state = cluster.args, cluster.state
    if not tiny_model.is_built(cluster.model_dir):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(state / "run"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "vllmcpu.tiny_model", str(cluster.model_dir)],
                       env=env, check=True, stdout=subprocess.DEVNULL, cwd=str(ROOT),
                       preexec_fn=_child_setup)
    ncpu = len(os.sched_getaffinity(0))
    cores = [int(c) for c in a.cores.split(",") if c.strip()] or list(range(ncpu))
    given = [a.port + i for i in range(a.engines)] if a.port else []
    given += [p for p in (a.controller_port, a.pull_port, a.reply_port, a.heartbeat_port)
              if p]
    for p in given:
        if port_in_use(p):
            raise SystemExit(f"{PREFIX} port {p} is in use")
    taken = set(given)
    eports = given[:a.engines] if a.port else free_ports(a.engines, taken)
    taken |= set(eports)
    for key, port in (("http", a.controller_port), ("pull", a.pull_port),
                      ("reply", a.reply_port), ("heartbeat", a.heartbeat_port)):
        cluster.ctl_ports[key] = port or free_ports(1, taken)[0]
        taken.add(cluster.ctl_ports[key])
    wports = free_ports(a.engines, taken)
    for i in range(a.engines):
        cluster.engines.append(Engine(f"engine-{i + 1}", eports[i], cores[i % len(cores)],
                                      wports[i]))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()
    parent = os.getppid()
    _prctl_pdeathsig(signal.SIGTERM)  # our parent dies -> our SIGTERM handler cleans up

    def on_signal(signum: int, _frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    state = a.state_dir.resolve()
    lock = claim_state_dir(state)
    cluster = Cluster(a, state, a.model_dir.resolve(), sockets=socket_dir(state))
    try:
        plan(cluster)
        if a.lmcache:
            cluster.controller = cluster.controller_child()
            cluster.controller.start()
        for e in cluster.engines:
            e.child = cluster.engine_child(e)
            e.child.start()
        say("started " + ", ".join(
            f"{e.id} on 127.0.0.1:{e.port} core {e.core} (pid {e.child.pid if e.child else 0})"
            for e in cluster.engines)
            + (f"; controller on 127.0.0.1:{cluster.ctl_ports['http']}"
               f" (pull {cluster.ctl_ports['pull']}, reply {cluster.ctl_ports['reply']},"
               f" pid {cluster.controller.pid})" if cluster.controller else "")
            + f"; logs in {state / 'run'}")

        cfg = cluster.kvgate_config()
        import yaml

        text = yaml.safe_dump(cfg, sort_keys=False)
        config_path = a.config_out.resolve() if a.config_out else None
        if config_path:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(text)
        print(f"{PREFIX} kvgate config" + (f" (written to {config_path})" if config_path
                                           else "") + ":", flush=True)
        print(text, end="", flush=True)
        if not a.lmcache:
            say("--no-lmcache: no controller, so the config has kvcache.enabled: false "
                "(kvgate balances only)")

        # ---- wait until healthy
        last = 0.0
        ctl_up = not a.lmcache
        while True:
            for c in cluster.children:
                if not c.alive():
                    say(f"{c.name} exited with {c.proc.returncode if c.proc else '?'} while "
                        f"starting; last lines of {c.log}:\n{c.tail()}")
                    return 1
            if os.getppid() != parent:
                raise Stop("parent died")
            if not ctl_up:
                ctl_up = cluster.controller_up()
            for e in cluster.engines:
                if not e.healthy:
                    status, _ = http("GET", e.url + "/health", timeout=1.0)
                    e.healthy = status == 200
                if a.lmcache and ctl_up and not e.registered:
                    e.registered = cluster.registered(e)
            done = ctl_up and all(e.healthy and (e.registered or not a.lmcache)
                                  for e in cluster.engines) and cluster.synced()
            elapsed = time.monotonic() - t0
            if done:
                break
            if elapsed - last >= a.progress_every:
                last = elapsed
                parts = []
                for e in cluster.engines:
                    s = "healthy" if e.healthy else "starting"
                    if a.lmcache and e.healthy:
                        s += ", registered" if e.registered else ", not registered yet"
                    parts.append(f"{e.id} {s}")
                if a.lmcache:
                    parts.append("controller " + ("up" if ctl_up else "starting"))
                    if all(e.registered for e in cluster.engines):
                        parts.append("first full sync " + ("over" if cluster.synced()
                                                           else "running"))
                say(f"waiting {elapsed:.0f}s: " + "; ".join(parts))
            if elapsed > a.timeout:
                say(f"not healthy after {a.timeout:.0f} s")
                for c in cluster.children:
                    say(f"last lines of {c.log}:\n{c.tail(15)}")
                return 1
            time.sleep(0.5)

        seconds = time.monotonic() - t0
        say(f"all healthy in {seconds:.1f} s")
        print(f"{PREFIX} ready " + json.dumps(cluster.ready_info(seconds, config_path)),
              flush=True)

        # ---- serve until told to stop
        commands: queue.Queue[str] = queue.Queue()
        if a.control:
            threading.Thread(target=_read_commands, args=(commands,), daemon=True).start()
        down: set[str] = set()  # stopped on purpose (--control)
        coming: dict[str, float] = {}  # restarted, not healthy yet
        told: dict[str, float] = {}  # when a restarting part's progress was last said
        while True:
            time.sleep(0.1 if coming else 0.5)
            if os.getppid() != parent:
                raise Stop("parent died")
            while not commands.empty():
                line = commands.get()
                answer = cluster.control(line, down, coming)
                say(f"control: {line} -> {answer}")
                print(f"{PREFIX} control " + json.dumps(answer), flush=True)
            for name, since in list(coming.items()):
                waited = time.monotonic() - since
                if waited - told.get(name, 0.0) >= 2 * a.progress_every:
                    told[name] = waited
                    say(f"{name} restarting, {waited:.0f}s: {cluster.pending(name)}")
                if cluster.came_up(name):
                    told.pop(name, None)
                    del coming[name]
                    child, _ = cluster.part(name)
                    up = {"id": name, "pid": child.pid if child else 0,
                          "seconds": round(time.monotonic() - since, 1)}
                    say(f"{name} is back: {up}")
                    print(f"{PREFIX} up " + json.dumps(up), flush=True)
            for c in cluster.children:
                if c.name not in down and not c.alive():
                    say(f"{c.name} exited with {c.proc.returncode if c.proc else '?'}; "
                        f"last lines of {c.log}:\n{c.tail()}")
                    return 1
    except Stop as why:
        say(f"{why}: shutting down")
        return 0
    finally:
        # no second signal may interrupt the cleanup
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        stop_all(cluster.children)
        if cluster.sockets is not None:
            cluster.sockets.unlink(missing_ok=True)
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
