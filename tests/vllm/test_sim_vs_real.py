"""The simulator against reality: one deterministic scenario played through kvgate on the
simulator (``kvgate-sim`` engines and the twin controller, with vLLM CPU's block of 128
and the tiny model's tokenizer) and on the real cluster (vLLM CPU + LMCache + the real
controller). Every step's routing decision (route, endpoint, matched tokens), token counts
(prompt, cached) and the controller's view afterwards must be the same in both.

The scenario is sequential (one request at a time) and writes the assistant turns itself,
so both worlds see the same token ids; what it does not exercise, the simulator may not
model (docs/real-vllm.md lists it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from kvgate.sim.cli import Cluster as SimCluster
from kvgate.sim.engine import EngineParams
from kvgate.sim.ports import free_ports

from vllm_harness import (
    LMCACHE_CHUNK,
    VLLM_BLOCK,
    RealCluster,
    gateway_config,
    post,
    start_gateway,
    text,
    tokens_of,
)

pytestmark = pytest.mark.vllm


@dataclass
class Step:
    name: str
    kind: str  # "direct" (to one engine, not through kvgate), "gateway", "reset"
    body: dict[str, Any] = field(default_factory=dict)
    engine: int = 0  # 1-based, for direct and reset (0: every engine)


@dataclass
class World:
    """One side of the comparison: engine urls in config order, a gateway, a controller."""

    name: str
    urls: list[str]
    ids: list[str]
    gateway_url: str
    controller: str
    settle: Callable[[list[int], int], None]
    """Wait until the controller has heard what engine i (1-based) stored of these tokens."""

    def index(self, eid: str) -> int:
        return self.ids.index(eid) + 1

    def tokens(self, body: dict[str, Any]) -> list[int]:
        if isinstance(body.get("prompt"), list):  # token ids: vLLM's /tokenize takes text
            return list(body["prompt"])
        form = ({"prompt": body["prompt"]} if "prompt" in body
                else {"messages": body["messages"]})
        r = requests.post(self.urls[0] + "/tokenize", json={"model": body["model"], **form},
                          timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    def lookup(self, tokens: list[int]) -> dict[int, int]:
        r = requests.post(self.controller + "/lookup", json={"tokens": tokens}, timeout=10)
        assert r.status_code == 200, r.text
        return {self.index(k): v[1] for k, v in r.json()["layout_info"].items()}

    def play(self, steps: list[Step]) -> list[dict[str, Any]]:
        out = []
        for step in steps:
            if step.kind == "reset":
                for i in ([step.engine] if step.engine else range(1, len(self.urls) + 1)):
                    r = requests.post(self.urls[i - 1] + "/reset_prefix_cache", timeout=30)
                    assert r.status_code == 200, (self.name, r.status_code)
                out.append({"step": step.name, "reset": step.engine or "all"})
                continue
            path = "/v1/chat/completions" if "messages" in step.body else "/v1/completions"
            base = (self.gateway_url if step.kind == "gateway"
                    else self.urls[step.engine - 1])
            r = requests.post(base + path, json=step.body, timeout=120,
                              headers={"Connection": "close"})
            assert r.status_code == 200, (self.name, step.name, r.text)
            usage = r.json()["usage"]
            if step.kind == "gateway":
                served = self.index(r.headers["x-kvcache-endpoint"])
                route = r.headers["x-kvcache-route"]
                matched = int(r.headers["x-kvcache-matched-tokens"])
            else:
                served, route, matched = step.engine, "direct", 0
            tokens = self.tokens(step.body)
            assert len(tokens) == usage["prompt_tokens"], (self.name, step.name)
            self.settle(tokens, served)
            out.append({"step": step.name, "route": route, "engine": served,
                        "matched": matched, "prompt_tokens": usage["prompt_tokens"],
                        "cached": usage["prompt_tokens_details"]["cached_tokens"],
                        "controller": self.lookup(tokens)})
        return out


def scenario(model: str, ids_1280: list[int]) -> list[Step]:
    """Chats whose first turns two engines served, their next turns through kvgate, a
    never-seen chat, a prefix both engines hold, a prefix-cache reset (LMCache must serve),
    a shared system prompt, token-id prompts of exactly 1280 tokens (10 blocks, 5 chunks)
    and one of an odd size."""
    def c(messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0}

    def p(prompt: Any) -> dict[str, Any]:
        return {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}

    sys = {k: {"role": "system", "content": text(f"simreal-{k}", 700)} for k in "ABC"}
    a1 = [sys["A"], {"role": "user", "content": "what does the document say"}]
    b1 = [sys["B"], {"role": "user", "content": "what does the table say"}]
    c1 = [sys["C"], {"role": "user", "content": "what is in the chapter"}]
    a2 = a1 + [{"role": "assistant", "content": "it says the cache routes the prompt"},
               {"role": "user", "content": "and what about the server"}]
    b2 = b1 + [{"role": "assistant", "content": "a number and a value"},
               {"role": "user", "content": "which number"}]
    c2 = c1 + [{"role": "assistant", "content": "a section about a model"},
               {"role": "user", "content": "which model"}]
    a3 = a2 + [{"role": "assistant", "content": "the server answers the client"},
               {"role": "user", "content": "and then"}]
    odd = text("simreal-odd", 530)
    return [
        Step("A1 on engine 1", "direct", c(a1), 1),
        Step("B1 on engine 2", "direct", c(b1), 2),
        Step("A2", "gateway", c(a2)),
        Step("B2", "gateway", c(b2)),
        Step("C1 never seen", "gateway", c(c1)),
        Step("C2", "gateway", c(c2)),
        # both engines hold C's system prompt now (engine 2 stores it first): lmcache 0.5.6
        # names, per chunk, the first *registered* instance holding it
        Step("C1 on engine 2 too", "direct", c(c1), 2),
        Step("C1 on engine 1 too", "direct", c(c1), 1),
        Step("C's system prompt, another question", "gateway",
             c([sys["C"], {"role": "user", "content": "who wrote the chapter"}])),
        Step("reset engine 1", "reset", engine=1),
        Step("A3 after the reset", "gateway", c(a3)),
        Step("A's system prompt, another question", "gateway",
             c([sys["A"], {"role": "user", "content": "who wrote the policy"}])),
        Step("1280 ids", "gateway", p(ids_1280)),
        Step("1280 ids again", "gateway", p(ids_1280)),
        Step("reset all", "reset"),
        Step("1280 ids after the reset", "gateway", p(ids_1280)),
        Step("odd prompt", "gateway", p(odd)),
        Step("odd prompt again", "gateway", p(odd)),
        Step("reset all again", "reset"),
        Step("odd prompt after the reset", "gateway", p(odd)),
    ]


def stored(tokens: list[int]) -> int:
    """What LMCache (0.5.6 defaults) stores of a prompt: its whole 256-token chunks."""
    return len(tokens) // LMCACHE_CHUNK * LMCACHE_CHUNK


def real_settle(cluster: RealCluster) -> Callable[[list[int], int], None]:
    """Until the controller has the engine's report of these tokens' whole chunks (LMCache
    reports in batches every 10 ms). A prefix an earlier registered engine holds too is
    named for that engine, so what is awaited is someone holding all the chunks, plus a
    moment for the serving engine's own report."""
    def settle(tokens: list[int], engine: int) -> None:
        want = stored(tokens)
        end = time.monotonic() + 15
        while want and time.monotonic() < end:
            r = post(cluster.ctl + "/lookup", {"tokens": tokens}, 10)
            if max((v[1] for v in r.json()["layout_info"].values()), default=0) >= want:
                break
            time.sleep(0.05)
        time.sleep(0.2)

    return settle


def registration_order(cluster: RealCluster) -> list[int]:
    """The real engines' indexes (1-based) in the order the controller registered them:
    the engines start together, so either can be first, and lmcache 0.5.6 credits a chunk
    two engines hold to the first registered."""
    times = {}
    for i, eid in enumerate(cluster.ids, 1):
        r = post(cluster.ctl + "/query_worker_info", {"instance_id": eid}, 10)
        assert r.status_code == 200, r.text
        times[i] = min(w["registration_time"] for w in r.json()["worker_infos"])
    return sorted(times, key=times.__getitem__)


def start_sim(params: EngineParams, order: list[int]) -> SimCluster:
    """Two simulated engines and the twin, the engines registering in ``order``."""
    *ports, ctl = free_ports(3)
    sim = SimCluster(2, ports[0], ctl, params)
    sim.ports = {f"vllm-{i}": ports[i - 1] for i in order}
    try:
        sim.start()
    except BaseException:
        sim.stop()
        raise
    return sim


def table(real: list[dict[str, Any]], sim: list[dict[str, Any]]) -> str:
    rows = ["step | real | sim"]
    for a, b in zip(real, sim, strict=True):
        mark = "" if a == b else "   <-- differs"
        rows.append(f"{a['step']} | {json.dumps({k: v for k, v in a.items() if k != 'step'})}"
                    f" | {json.dumps({k: v for k, v in b.items() if k != 'step'})}{mark}")
    return "\n".join(rows)


def test_the_simulator_routes_and_caches_like_the_real_engines(
        cluster: RealCluster, tmp_path: Path) -> None:
    model = cluster.model
    ids_1280 = tokens_of(cluster, {"prompt": text("simreal-ids", 1200)})[:1280]
    assert len(ids_1280) == 1280
    steps = scenario(model, ids_1280)

    # the real side. Every gateway request asks the controller: a reused lookup answer
    # (lookup_cache_ttl, lookup_stale_ttl) would make a repeat's matched tokens depend on
    # how long the steps took, and the real engines take longer than the simulated ones.
    cfg = gateway_config(cluster, lookup_cache_ttl=0, lookup_stale_ttl=0)
    gw = start_gateway(tmp_path / "gw-real", cfg)
    try:
        real = World("real", [cluster.url(i) for i in cluster.ids], cluster.ids, gw.url,
                     cluster.ctl, real_settle(cluster)).play(steps)
    finally:
        gw.stop()

    # the simulated side: same kvgate config, simulated engines like vLLM CPU + LMCache
    params = EngineParams(block_size=VLLM_BLOCK, tokenizer=cluster.info["model_dir"],
                          model=model, time_scale=0.0, max_output=2,
                          gpu_tokens=2_000_000, cpu_tokens=2_000_000)
    order = registration_order(cluster)
    sim = start_sim(params, order)
    try:
        sim_ids = sorted(sim.ports)  # config order: vllm-1, vllm-2 as engine-1, engine-2
        sim_cfg = json.loads(json.dumps(cfg))
        sim_cfg["kvcache"]["vllm_endpoint"] = f"http://127.0.0.1:{sim.ports[sim_ids[0]]}"
        sim_cfg["kvcache"]["lmcache_endpoint"] = f"http://127.0.0.1:{sim.controller_port}"
        sim_cfg["clusters"][0]["endpoints"] = [
            {"id": eid, "socket_address": {"address": "127.0.0.1", "port": sim.ports[eid]}}
            for eid in sim_ids]
        gw = start_gateway(tmp_path / "gw-sim", sim_cfg)
        try:
            simulated = World("sim", [f"http://127.0.0.1:{sim.ports[i]}" for i in sim_ids],
                              sim_ids, gw.url, f"http://127.0.0.1:{sim.controller_port}",
                              lambda tokens, engine: sim.flush()).play(steps)
        finally:
            gw.stop()
    finally:
        sim.stop()

    (tmp_path / "sim_vs_real.json").write_text(json.dumps({"real": real, "sim": simulated},
                                                          indent=1))
    print("\n" + table(real, simulated))
    # the scenario did exercise what it is about
    by_step = {r["step"]: r for r in real}
    assert by_step["A2"]["route"] == "cache" and by_step["A2"]["engine"] == 1
    assert by_step["B2"]["route"] == "cache" and by_step["B2"]["engine"] == 2
    assert by_step["A3 after the reset"]["cached"] % LMCACHE_CHUNK == 0
    assert by_step["1280 ids again"]["cached"] == 1279
    assert by_step["odd prompt again"]["cached"] % VLLM_BLOCK == 0
    assert list(by_step["C1 on engine 1 too"]["controller"]) == [order[0]]
    assert real == simulated, table(real, simulated)
