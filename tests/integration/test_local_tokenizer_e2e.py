"""A first-sight prompt routed on in-process tokens: mitmdump + addon, simulated engines that
tokenize with the same tokenizer.json, the twin controller. No /tokenize on the way."""

from __future__ import annotations

import re
from pathlib import Path

import requests

from kvgate.sim.cli import Cluster
from kvgate.sim.engine import EngineParams
from kvgate.sim.hf_tokenizer import make_tokenizer_dir
from kvgate.sim.ports import free_port, free_ports

from harness import start_mitmdump


def _counter(text: str, helper: str, result: str) -> float:
    found = re.search(
        rf'^kvgate_helper_calls_total{{helper="{helper}",result="{result}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_first_sight_chat_routes_by_cache_on_local_tokens(tmp_path: Path) -> None:
    tok = make_tokenizer_dir(str(tmp_path / "tok"))
    p1, p2, ctl = free_ports(3)
    cluster = Cluster(2, p1, ctl, EngineParams(time_scale=0.01, max_output=4, tokenizer=tok))
    cluster.ports = {"vllm-1": p1, "vllm-2": p2}
    cluster.start()
    gw = None
    try:
        system = " ".join(f"the cache engine {i} routes a prompt" for i in range(150))
        first = {"model": "m", "messages": [{"role": "system", "content": system},
                                            {"role": "user", "content": "what is a cache"}]}
        # vllm-2 serves the conversation's first turn directly: it holds the system prompt
        r = requests.post(f"http://127.0.0.1:{p2}/v1/chat/completions", json=first, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 600
        cluster.flush()
        cfg = cluster.config()
        cfg["kvcache"]["tokenizers"] = {"m": tok}
        cfg["kvcache"]["metrics_port"] = admin = free_port()
        gw = start_mitmdump(tmp_path, cfg, mode=f"reverse:http://127.0.0.1:{p1}")
        # a different question after the same system prompt: never seen by the gateway
        second = {"model": "m", "messages": [first["messages"][0],
                                             {"role": "user", "content": "and a prefix"}]}
        r = gw.post("/v1/chat/completions", second)
        assert r.status_code == 200
        assert r.headers["x-kvcache-route"] == "cache"
        assert r.headers["x-kvcache-endpoint"] == "vllm-2"
        assert int(r.headers["x-kvcache-matched-tokens"]) >= 512
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512
        text = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
        assert _counter(text, "tokenize", "local") >= 1
        assert _counter(text, "tokenize", "routing_ok") == 0  # no /tokenize round trip
    finally:
        if gw is not None:
            gw.stop()
        cluster.stop()
