"""The real-controller tier: simulated engines reporting to lmcache 0.5.6's controller.

Needs ``.venv-lmcache`` (``scripts/lmcache-controller --install-only``; ``scripts/test``
installs it). Run just this tier with ``scripts/test -m lmcache``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kvgate.sim.cli import Cluster
from kvgate.sim.engine import EngineParams
from kvgate.sim.ports import free_ports

from harness import start_mitmdump

pytestmark = pytest.mark.lmcache

ROOT = Path(__file__).resolve().parents[2]
PARAMS = EngineParams(time_scale=0.01, max_output=8)


def _installed() -> bool:
    return (ROOT / ".venv-lmcache" / ".kvgate-lmcache-0.5.6").exists()


@pytest.fixture(scope="module")
def real() -> Iterator[Cluster]:
    if not _installed():
        if os.environ.get("CI"):
            pytest.fail("the LMCache venv is missing: scripts/test installs it")
        pytest.skip("run scripts/lmcache-controller --install-only first")
    p1, p2, ctl_port = free_ports(3)
    cluster = Cluster(2, p1, ctl_port, PARAMS, real=True)
    cluster.ports = {"vllm-1": p1, "vllm-2": p2}
    cluster.start()
    yield cluster
    cluster.stop()


def post(url: str, body: Any, timeout: float = 10) -> requests.Response:
    return requests.post(url, json=body, timeout=timeout)


def ctl(cluster: Cluster) -> str:
    return f"http://127.0.0.1:{cluster.controller_port}"


def engine_url(cluster: Cluster, eid: str) -> str:
    return f"http://127.0.0.1:{cluster.ports[eid]}"


def tokens_of(cluster: Cluster, body: dict) -> list[int]:
    return post(engine_url(cluster, "vllm-1") + "/tokenize", body).json()["tokens"]


def wait_holder(cluster: Cluster, tokens: list[int], eid: str, timeout: float = 30) -> int:
    """Wait until the controller says ``eid`` holds a prefix of ``tokens``; its length."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            layout = post(ctl(cluster) + "/lookup", {"tokens": tokens}, 5).json()["layout_info"]
        except (requests.RequestException, ValueError, KeyError):
            layout = {}
        if eid in layout and layout[eid][1] > 0:
            return layout[eid][1]
        time.sleep(0.2)
    raise AssertionError(f"controller never reported {eid} holding the tokens")


def metric(cluster: Cluster, eid: str, name: str) -> float:
    text = requests.get(engine_url(cluster, eid) + "/metrics", timeout=5).text
    found = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def served_by(cluster: Cluster, eid: str, body: dict) -> list[int]:
    """Have ``eid`` serve ``body`` directly, wait until the controller knows; its tokens."""
    assert post(engine_url(cluster, eid) + "/v1/completions", body).status_code == 200
    tokens = tokens_of(cluster, body)
    wait_holder(cluster, tokens, eid)
    return tokens


def post_until(gw: Any, body: dict, header: str, value: str, pause: float,
               timeout: float = 20) -> requests.Response:
    """POST through the gateway until the answer's ``header`` is ``value`` (or time is up)."""
    end = time.monotonic() + timeout
    while True:
        r = gw.post("/v1/completions", body)
        assert r.status_code == 200
        if r.headers[header] == value or time.monotonic() >= end:
            return r
        time.sleep(pause)


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_second_turn_goes_where_the_real_controller_says(real: Cluster, tmp_path: Path) -> None:
    gw = start_mitmdump(tmp_path, real.config(),
                        mode=f"reverse:{real.config()['kvcache']['vllm_endpoint']}")
    try:
        history = [{"role": "system", "content": words("sys-a", 600)},
                   {"role": "user", "content": "first question"}]
        r1 = gw.post("/v1/chat/completions", {"model": "m", "messages": history})
        assert r1.status_code == 200
        first = r1.headers["x-engine-id"]
        wait_holder(real, tokens_of(real, {"messages": history}), first)
        history += [{"role": "assistant", "content": r1.json()["choices"][0]["message"]
                     ["content"]}, {"role": "user", "content": "second question"}]
        r2 = gw.post("/v1/chat/completions", {"model": "m", "messages": history})
        assert r2.headers["x-kvcache-route"] == "cache"
        assert r2.headers["x-engine-id"] == first
        assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512
    finally:
        gw.stop()


def test_pins_and_compresses_reach_the_engine_holding_the_tokens(real: Cluster,
                                                                 tmp_path: Path) -> None:
    body = {"model": "m", "prompt": words("doc-b", 700)}
    served_by(real, "vllm-2", body)
    cfg = real.config()
    cfg["kvcache"]["signals"] = "process"  # compress on the gateway's CPU, as the seed did
    cfg["kvcache"]["cache_strategy"] = {
        "enable_pinning": True, "hot_content_threshold": 1,
        "pin_instance_id": "vllm-2", "pin_location": "LocalCPUBackend",
        "enable_compression": True, "load_threshold": 0.000001,
        "compress_instance_id": "vllm-2", "compress_location": "LocalCPUBackend",
    }
    gw = start_mitmdump(tmp_path, cfg, mode=f"reverse:{cfg['kvcache']['vllm_endpoint']}")
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            assert gw.post("/v1/completions", body).status_code == 200
            if (metric(real, "vllm-2", "kvgate_sim:pinned_tokens") > 0
                    and metric(real, "vllm-2", "kvgate_sim:compressed_tokens") > 0):
                break
            time.sleep(0.2)
        # 700 tokens: LMCache (0.5.6 defaults) holds the two whole 256-token chunks
        assert metric(real, "vllm-2", "kvgate_sim:pinned_tokens") == 512
        assert metric(real, "vllm-2", "kvgate_sim:compressed_tokens") == 512
        assert metric(real, "vllm-1", "kvgate_sim:pinned_tokens") == 0
    finally:
        gw.stop()


def test_twin_and_real_controller_answer_alike(real: Cluster) -> None:
    p1, p2, ctl_port = free_ports(3)
    twin = Cluster(2, p1, ctl_port, PARAMS)
    twin.ports = {"vllm-1": p1, "vllm-2": p2}
    twin.start()
    try:
        prompts = {"vllm-1": words("same-c", 900), "vllm-2": words("same-d", 300)}
        for cluster in (real, twin):
            for eid, prompt in prompts.items():
                r = post(engine_url(cluster, eid) + "/v1/completions",
                         {"model": "m", "prompt": prompt})
                assert r.status_code == 200
        twin.flush()
        t1 = tokens_of(real, {"prompt": prompts["vllm-1"]})
        t2 = tokens_of(real, {"prompt": prompts["vllm-2"]})
        wait_holder(real, t1, "vllm-1")
        wait_holder(real, t2, "vllm-2")
        queries = [t1, t1[:600], t1[:256], t1 + [7, 8, 9], t2, t2[:100], [1, 2, 3]]
        for tokens in queries:
            a = post(ctl(real) + "/lookup", {"tokens": tokens}).json()["layout_info"]
            b = post(ctl(twin) + "/lookup", {"tokens": tokens}).json()["layout_info"]
            assert a == b, (len(tokens), a, b)
        pin = {"instance_id": "vllm-1", "location": "LocalCPUBackend", "tokens": t1}
        a, b = post(ctl(real) + "/pin", pin), post(ctl(twin) + "/pin", pin)
        assert a.status_code == b.status_code == 200
        # whole chunks only: LMCache does not store a prompt's partial last chunk
        assert a.json()["num_tokens"] == b.json()["num_tokens"] == len(t1) // 256 * 256
        for path, payload in (
            ("/evict", {"instance_id": "vllm-1", "tokens": t1}),
            ("/move", {"old_position": ["vllm-1", "LocalCPUBackend"],
                       "new_position": ["vllm-2", "LocalCPUBackend"], "tokens": t1,
                       "should_copy": False}),
        ):
            a, b = post(ctl(real) + path, payload), post(ctl(twin) + path, payload)
            assert a.status_code == b.status_code, path
            assert set(a.json()) == set(b.json()) == {"detail"}
    finally:
        twin.stop()


def test_discovery_adds_an_engine_the_config_does_not_list(real: Cluster,
                                                          tmp_path: Path) -> None:
    """The real registry answers instance_id "all"; vllm-2 joins and is routed to by cache."""
    body = {"model": "m", "prompt": words("disc-f", 700)}
    served_by(real, "vllm-2", body)
    cfg = real.config()
    cfg["clusters"][0]["endpoints"] = [ep for ep in cfg["clusters"][0]["endpoints"]
                                       if ep["id"] == "vllm-1"]
    cfg["kvcache"]["discovery"] = {"enabled": True, "interval": "300ms",
                                   "engine_port": real.ports["vllm-2"]}
    gw = start_mitmdump(tmp_path, cfg, mode=f"reverse:{cfg['kvcache']['vllm_endpoint']}")
    try:
        r = post_until(gw, body, "x-kvcache-endpoint", "vllm-2", 0.3)
        assert r.headers["x-kvcache-endpoint"] == "vllm-2"
        assert r.headers["x-kvcache-route"] == "cache"
        assert r.headers["x-engine-id"] == "vllm-2"
    finally:
        gw.stop()


def test_gateway_serves_through_a_controller_restart(real: Cluster, tmp_path: Path) -> None:
    body = {"model": "m", "prompt": words("restart-e", 500)}
    tokens = served_by(real, "vllm-1", body)
    cfg = real.config()
    cfg["kvcache"]["circuit_breaker"] = {"failure_threshold": 2, "recovery_timeout": "1s"}
    gw = start_mitmdump(tmp_path, cfg, mode=f"reverse:{cfg['kvcache']['vllm_endpoint']}")
    try:
        real.stop_real_controller()
        routes = []
        for i in range(6):
            r = gw.post("/v1/completions", {"model": "m", "prompt": words(f"down{i}", 50)})
            assert r.status_code == 200
            routes.append(r.headers["x-kvcache-route"])
        assert set(routes) == {"fallback"}
        real.start_real_controller()
        wait_holder(real, tokens, "vllm-1", timeout=60)  # the worker re-registered, resent
        r = post_until(gw, body, "x-kvcache-route", "cache", 0.5)
        assert r.headers["x-kvcache-route"] == "cache"
        assert r.headers["x-engine-id"] == "vllm-1"
        assert json.loads(r.content)["usage"]["prompt_tokens"] == len(tokens)
    finally:
        gw.stop()
