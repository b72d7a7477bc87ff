"""The routers a benchmark run can put in front of the cluster, each started fresh.

kvgate runs as the README says (mitmdump, reverse mode, the addon); the open routers run
from their pip wheels, each in a venv of its own (``scripts/bench`` installs them):
``vllm-router==0.1.17`` and ``sglang-router==0.3.2`` (REFERENCE.md section 7), at their
defaults but for the policy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .cluster import ROOT, SimCluster
from .real_cluster import RealCluster

sys.path.insert(0, str(ROOT / "addon"))
from kvgate.sim.ports import free_port  # noqa: E402
from kvgate.sim.run import gateway  # noqa: E402

VLLM_ROUTER = ROOT / ".venv-vllm-router" / "bin" / "vllm-router"
SGLANG_PY = ROOT / ".venv-sglang-router" / "bin" / "python"


@dataclass(frozen=True)
class Router:
    name: str
    kind: str  # kvgate | vllm-router | sglang
    setting: str  # kvgate: a policy (or round_robin / seed); peers: their --policy
    peer: bool = False
    knobs: tuple[tuple[str, float], ...] = ()
    """kvgate with these knobs set (``kvgate@replicate=2``): its cost model's go to
    ``policies.kvgate``, the gateway's own numbers to ``kvcache``."""

    @property
    def available(self) -> bool:
        if self.kind == "vllm-router":
            return VLLM_ROUTER.exists()
        if self.kind == "sglang":
            return SGLANG_PY.exists()
        return True


ROUTERS = {r.name: r for r in (
    Router("round_robin", "kvgate", "round_robin"),
    Router("seed", "kvgate", "seed"),
    Router("kvgate", "kvgate", "kvgate"),
    Router("kvgate:loadaware", "kvgate", "loadaware"),
    Router("kvgate:cache_aware", "kvgate", "cache_aware"),
    Router("vllm-router:cache_aware", "vllm-router", "cache_aware", peer=True),
    Router("vllm-router:power_of_two", "vllm-router", "power_of_two", peer=True),
    Router("sglang:cache_aware", "sglang", "cache_aware", peer=True),
    Router("sglang:power_of_two", "sglang", "power_of_two", peer=True),
)}


def _rule_knobs() -> set[str]:
    """The knobs of kvgate's cost model (``policies.kvgate``), as against the gateway's."""
    from kvgate.policies.predicted_ttft import CostModel

    return {f.name for f in fields(CostModel)}


def find_router(name: str) -> Router:
    """A router by name: one of ``ROUTERS``, or kvgate with knobs set,
    ``kvgate@replicate=2`` (``@`` between several), to see what a knob trades on the same
    stream as the default. A knob is a field of kvgate's cost model
    (``policies.kvgate.<knob>``) or a number of the gateway's own (``min_batch_slots``,
    ``lookup_cache_ttl``, ...: ``kvcache.<knob>``). KeyError names what is wrong."""
    if name in ROUTERS:
        return ROUTERS[name]
    base, _, rest = name.partition("@")
    if base != "kvgate" or not rest:
        raise KeyError(name)
    from kvgate.config.rules import validate
    from kvgate.config.schema import KVCacheConfig
    from kvgate.policies.predicted_ttft import CostModel

    rule = _rule_knobs()
    own = {f.name: f.type for f in fields(KVCacheConfig) if f.type in ("int", "float")}
    knobs = []
    for item in rest.split("@"):
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise KeyError(f"{name} ({item}: want knob=number)") from None
        if key not in rule and key not in own:
            raise KeyError(f"{name} ({key}: not a knob of kvgate, "
                           f"{', '.join(sorted(rule | set(own)))})")
        if key not in rule and own[key] == "int":
            if not number.is_integer():
                raise KeyError(f"{name} ({key}: a whole number)")
            number = int(number)
        knobs.append((key, number))
    try:  # out of range: said here, not by a gateway that will not start mid-sweep
        CostModel(**{k: v for k, v in knobs if k in rule}).check()
        validate(KVCacheConfig(**{k: v for k, v in knobs if k not in rule}))
    except ValueError as e:
        raise KeyError(f"{name} ({e})") from None
    return Router(name, "kvgate", "kvgate", knobs=tuple(knobs))


def kvgate_config(cluster: SimCluster | RealCluster, setting: str,
                  knobs: tuple[tuple[str, float], ...] = ()) -> dict[str, Any]:
    cfg = cluster.config()
    kv = cfg["kvcache"]
    kv.pop("lookup_routing_timeout", None)  # the defaults, as a user starts
    kv["debug_headers"] = False
    if setting == "round_robin":
        kv["enabled"] = False  # the balancer alone
    elif setting == "seed":  # the seed's rule: exact repeats only, longest match
        kv.update({"policy": "longest_prefix", "route_on_miss": False, "lookup_cache_ttl": 0})
    elif setting != "kvgate":
        kv["policy"] = setting
    if os.environ.get("KVGATE_BENCH_KV") and setting == "kvgate":
        kv.update(json.loads(os.environ["KVGATE_BENCH_KV"]))  # experiments only
    if knobs:
        rule = _rule_knobs()
        if any(k in rule for k, _ in knobs):
            kv["policies"] = {"kvgate": {k: v for k, v in knobs if k in rule}}
        kv.update({k: v for k, v in knobs if k not in rule})
    return cfg


def _ready(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited: {log.read_text(errors='replace')[-1500:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 (loopback)
                body = r.read()
            if r.status == 200 and b"not ready" not in body.lower():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"router not ready: {log.read_text(errors='replace')[-1500:]}")


@contextlib.contextmanager
def _process(argv: list[str], ready_path: str, port: int, log: Path) -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        _ready(f"http://127.0.0.1:{port}{ready_path}", 60, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@dataclass
class Running:
    url: str
    metrics_url: str = ""

    def scrape(self) -> dict[str, dict[str, float]]:
        """From kvgate's admin port, for the diagnosis: its routing decisions by reason
        ("routes") and the mean time of its calls on the request path, in ms
        ("helper_ms": tokenize, lookup): what it pays that round robin does not."""
        if not self.metrics_url:
            return {}
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as r:  # noqa: S310
                text = r.read().decode()
        except OSError:
            return {}
        return parse_scrape(text)


def parse_scrape(text: str) -> dict[str, dict[str, float]]:
    routes: dict[str, float] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("kvgate_routing_decisions_total{"):
            routes[name.split('reason="', 1)[1].split('"', 1)[0]] = float(value)
        for call in ("tokenize", "lookup"):
            if name == f"kvgate_{call}_seconds_sum":
                sums[call] = float(value)
            elif name == f"kvgate_{call}_seconds_count":
                counts[call] = float(value)
    out: dict[str, dict[str, float]] = {"routes": routes} if routes else {}
    helper = {call: round(1000 * sums[call] / n, 3)
              for call, n in counts.items() if n > 0 and call in sums}
    if helper:
        out["helper_ms"] = helper
    return out


@contextlib.contextmanager
def start(router: Router, cluster: SimCluster | RealCluster, log_dir: Path) -> Iterator[Running]:
    """The router in front of ``cluster``, ready."""
    log = log_dir / f"{router.name.replace(':', '-')}.log"
    workers = cluster.urls
    if router.kind == "kvgate":
        cfg = kvgate_config(cluster, router.setting, router.knobs)
        admin = free_port()
        cfg["kvcache"]["metrics_port"] = admin
        with gateway(cfg, workers[0]) as port:
            yield Running(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}/metrics")
        return
    port, metrics = free_port(), free_port()
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
              "--policy", router.setting, "--prometheus-host", "127.0.0.1",
              "--prometheus-port", str(metrics)]
    if router.kind == "vllm-router":
        argv = [str(VLLM_ROUTER), *common, "--log-level", "warning"]
    else:
        argv = [str(SGLANG_PY), "-m", "sglang_router.launch_router", *common,
                "--log-level", "warn"]
    with _process(argv, "/readiness", port, log) as url:
        yield Running(url)
