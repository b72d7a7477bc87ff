"""The real-vLLM tier's faults: an engine killed mid-run and restarted, the LMCache
controller stopped and restarted while traffic flows. Run last (conftest.py), each leaves
the cluster whole again.

Requests fail or succeed as the client sees them through kvgate in a real mitmdump; the
first moments after a kill, before kvgate's active health check has noticed, are measured
and printed (``-s`` shows them), not hidden: the assertion is on what comes after.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from vllm_harness import (
    LMCACHE_CHUNK,
    Gateway,
    RealCluster,
    chat,
    completion,
    endpoint_healthy,
    gateway_config,
    lookup,
    post,
    prompt_totals,
    served_by,
    start_gateway,
    text,
    tokens_of,
    wait_holder,
)

pytestmark = pytest.mark.vllm

HEALTH_INTERVAL = 0.5  # kvgate's health_check_interval, set explicitly (its default)
GRACE = 3.0  # after a kill: a few health checks on a loaded 2-core machine


@dataclass
class Outcome:
    at: float  # seconds since the fault
    what: str  # "doc" (held by the faulted part) or "fresh"
    status: int  # 0: no answer (connection error, timeout)
    route: str
    endpoint: str
    cached: int
    error: str = ""


def send(gw: Gateway, body: dict[str, Any], path: str = "/v1/completions") -> tuple[
        int, str, str, int, str]:
    """One request as a client sees it: status, route, endpoint, cached tokens, error."""
    try:
        r = gw.post(path, body)
    except requests.RequestException as exc:
        return 0, "", "", 0, type(exc).__name__
    if r.status_code != 200:
        return r.status_code, r.headers.get("x-kvcache-route", ""), r.headers.get(
            "x-kvcache-endpoint", ""), 0, r.text[:200]
    usage = r.json().get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return 200, r.headers["x-kvcache-route"], r.headers["x-kvcache-endpoint"], cached, ""


class Traffic:
    """A client sending requests through the gateway one after another, in a thread:
    repeats of a document some engine holds, and never-seen prompts in between."""

    def __init__(self, gw: Gateway, cluster: RealCluster, doc: dict[str, Any], tag: str,
                 pause: float = 0.2) -> None:
        self.gw, self.cluster, self.doc, self.tag, self.pause = gw, cluster, doc, tag, pause
        self.t0 = time.monotonic()
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def mark(self) -> None:
        """The fault happens now: outcome times count from here."""
        self.t0 = time.monotonic()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            if i % 2 == 0:
                what, body = "doc", self.doc
            else:
                what, body = "fresh", completion(self.cluster, text(f"{self.tag}-{i}", 300))
            at = time.monotonic() - self.t0
            self.outcomes.append(Outcome(at, what, *send(self.gw, body)))
            i += 1
            time.sleep(self.pause)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(150)
        return self.outcomes


def report(title: str, outcomes: list[Outcome]) -> None:
    failed = [o for o in outcomes if o.status != 200]
    print(f"\n[{title}] {len(outcomes)} requests, {len(failed)} failed")
    for o in failed:
        print(f"  failed at +{o.at:.2f}s ({o.what}): {o.status} {o.route} {o.endpoint} "
              f"{o.error}")


def test_a_killed_engine_leaves_rotation_and_comes_back_by_cache(
        cluster: RealCluster, tmp_path: Path) -> None:
    cfg = gateway_config(cluster, health_check_interval=f"{int(HEALTH_INTERVAL * 1000)}ms")
    doc = completion(cluster, text("kill-h-doc", 800))
    doc_tokens = tokens_of(cluster, {"prompt": doc["prompt"]})
    assert post(cluster.url("engine-1") + "/v1/completions", doc).status_code == 200
    wait_holder(cluster, doc_tokens, "engine-1")
    # mitmproxy's reverse mode connects to its target (engine-1 here: the config's
    # vllm_endpoint) as soon as a client connects, before kvgate has chosen an endpoint;
    # with that target dead, every connection fails (measured: 161 of 167 requests in
    # 7 s, the client's connection closed). "lazy" connects to the endpoint kvgate chose.
    gw = start_gateway(tmp_path / "gw", cfg, connection_strategy="lazy")
    restarted = False
    traffic: Traffic | None = None
    try:
        status, route, endpoint, _, err = send(gw, doc)
        assert (status, route, endpoint) == (200, "cache", "engine-1"), err
        traffic = Traffic(gw, cluster, doc, "kill-h").start()
        time.sleep(1.0)
        before = len(traffic.outcomes)
        traffic.mark()
        killed = cluster.control("kill engine-1")  # SIGKILL its process group
        assert not killed["alive"]
        time.sleep(GRACE + 3.0)
        ejected = endpoint_healthy(gw)
        outcomes = traffic.stop()
        during = outcomes[before:]
        report("engine-1 killed", during)
        assert all(o.status == 200 for o in outcomes[:before])
        early = [o for o in during if o.at < GRACE]
        later = [o for o in during if o.at >= GRACE]
        assert len(later) >= 6, f"too little traffic after the grace period: {len(later)}"
        # out of rotation: every request after the grace period succeeds, on engine-2
        assert [o for o in later if o.status != 200] == []
        assert {o.endpoint for o in later} == {"engine-2"}
        assert ejected == {"engine-1": 0.0, "engine-2": 1.0}
        # the document moved with the traffic: engine-2 serves it from its own cache now.
        # (The controller may still name dead engine-1 for its chunks: lmcache 0.5.6
        # answers, per chunk, the first registered instance holding it, and keeps a
        # killed worker registered, so the route kvgate reports for it varies.)
        assert [o for o in later if o.what == "doc"][-1].cached >= LMCACHE_CHUNK
        print(f"[engine-1 killed] routes of the document after the grace period: "
              f"{sorted({o.route for o in later if o.what == 'doc'})}")
        print(f"[engine-1 killed] failed in the first {GRACE:.0f} s: "
              f"{sum(o.status != 200 for o in early)} of {len(early)}")

        # restarted: same port, same instance id; the controller still had it registered
        ctl_log = Path(cluster.info["controller"]["log"])
        seen = ctl_log.read_text(errors="replace").count(
            "Instance-worker ('engine-1', 0) already registered")
        t0 = time.monotonic()
        cluster.control("start engine-1")
        up = cluster.wait_up("engine-1")
        restarted = True
        print(f"[engine-1 restarted] healthy and registered in {up['seconds']} s")
        assert ctl_log.read_text(errors="replace").count(
            "Instance-worker ('engine-1', 0) already registered") == seen + 1
        # LMCache in the new engine holds nothing, and the controller forgot the old one's
        # chunks when it registered again: nothing routes there on stale news
        assert "engine-1" not in lookup(cluster, doc_tokens)
        end = time.monotonic() + 10 * HEALTH_INTERVAL + 5
        while endpoint_healthy(gw).get("engine-1") != 1.0:
            assert time.monotonic() < end, "kvgate never put engine-1 back in rotation"
            time.sleep(0.1)
        print(f"[engine-1 restarted] back in kvgate's rotation {time.monotonic() - t0:.1f} s "
              f"after the start command")

        # routed to by cache again: a conversation whose first turn engine-1 served
        history = [{"role": "system", "content": text("kill-h-back", 800)},
                   {"role": "user", "content": "what changed"}]
        assert post(cluster.url("engine-1") + "/v1/chat/completions",
                    chat(cluster, history)).status_code == 200
        wait_holder(cluster, tokens_of(cluster, {"messages": history}), "engine-1")
        history += [{"role": "assistant", "content": "the engine came back"},
                    {"role": "user", "content": "and then"}]
        before_totals = prompt_totals(cluster)
        r = gw.post("/v1/chat/completions", chat(cluster, history))
        assert r.status_code == 200, r.text
        assert r.headers["x-kvcache-route"] == "cache"
        assert r.headers["x-kvcache-endpoint"] == "engine-1"
        usage = r.json()["usage"]
        assert served_by(cluster, before_totals, usage["prompt_tokens"]) == "engine-1"
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 2 * LMCACHE_CHUNK
    finally:
        if traffic is not None:
            traffic.stop()  # before the gateway: no request in flight when it stops
        gw.stop()
        if not restarted and "engine-1" in cluster.ids:  # leave the cluster whole
            try:
                cluster.control("start engine-1")
                cluster.wait_up("engine-1")
            except AssertionError:
                pass


def test_controller_restart_under_traffic_no_client_error_and_cache_routing_resumes(
        cluster: RealCluster, tmp_path: Path) -> None:
    """The controller stopped (SIGTERM) and started again on the same ports while a client
    keeps sending. kvgate routes on without it (the breaker opens; its prefix index routes
    what it has seen, the rest by rotation); lmcache 0.5.6 workers re-register on their
    next heartbeat and send a full sync of what they hold, and routing by cache resumes."""
    cfg = gateway_config(cluster, circuit_breaker={"failure_threshold": 2,
                                                   "recovery_timeout": "1s"})
    doc = completion(cluster, text("ctl-i-doc", 800))
    doc_tokens = tokens_of(cluster, {"prompt": doc["prompt"]})
    assert post(cluster.url("engine-2") + "/v1/completions", doc).status_code == 200
    held = wait_holder(cluster, doc_tokens, "engine-2")
    gw = start_gateway(tmp_path / "gw", cfg)
    traffic: Traffic | None = None
    stopped = False
    try:
        traffic = Traffic(gw, cluster, doc, "ctl-i").start()
        time.sleep(1.0)
        traffic.mark()
        cluster.control("stop controller")
        stopped = True
        time.sleep(3.0)
        down_until = time.monotonic() - traffic.t0
        cluster.control("start controller")
        # "up": it answers, and every worker's heartbeat found it: re-registered, synced
        up = cluster.wait_up("controller", 120)
        stopped = False
        print(f"\n[controller restarted] up, workers re-registered and synced, "
              f"{up['seconds']} s after the start command")
        layout = lookup(cluster, doc_tokens)
        # lmcache 0.5.6 names, per chunk, the first registered instance that holds it:
        # engine-2, or engine-1 if the traffic's fallback rotation had it serve the doc
        assert layout and max(n for _, n in layout.values()) == held, layout
        # and cache routing resumes: a repeat of the document goes by cache to the holder
        end = time.monotonic() + 30
        while time.monotonic() < end:
            time.sleep(0.5)
            if any(o.route == "cache" for o in traffic.outcomes
                   if o.what == "doc" and o.at > down_until):
                break
    finally:
        outcomes = traffic.stop() if traffic is not None else []  # before the gateway
        if stopped:
            cluster.control("start controller")
            cluster.wait_up("controller", 120)
        gw.stop()
    report("controller restarted", outcomes)
    assert [o for o in outcomes if o.status != 200] == []  # no client saw an error
    # kvgate did route without the controller (a repeat seen within lookup_cache_ttl may
    # still go by its last answer, so not every route in the gap is a fallback)
    down = [o for o in outcomes if 1.0 < o.at < down_until]
    assert any(o.route == "fallback" for o in down), down
    resumed = [o for o in outcomes if o.what == "doc" and o.route == "cache"
               and o.at > down_until]
    assert resumed, [(o.at, o.what, o.route) for o in outcomes]
    # holders: what LMCache names (one instance per chunk in lmcache 0.5.6), engine-2, and
    # any engine that served the document before (the fallback rotation in the gap: seen
    # once in CI, a cache route to engine-1 with the whole document cached there)
    served = {o.endpoint for o in outcomes if o.what == "doc" and o.status == 200
              and o not in resumed}
    holders = set(lookup(cluster, doc_tokens)) | {"engine-2"} | served
    assert {o.endpoint for o in resumed} <= holders, (resumed, holders)
    assert all(o.cached >= held for o in resumed)
    print(f"[controller restarted] routes of the document after the restart: "
          f"{[o.route for o in outcomes if o.what == 'doc' and o.at > down_until]}")
    # what an engine stores after the restart is reported to the new controller too. In
    # one clean-clone CI run of three on 2026-12-01 the first prompt sent right after the
    # restart's full syncs never showed up at the controller (its engine's log has no
    # LMCache store for it). A second, different prompt is sent then; if neither is
    # reported, the test fails.
    reported = None
    for attempt in ("ctl-i-after", "ctl-i-after-2"):
        fresh = completion(cluster, text(attempt, 800))
        assert post(cluster.url("engine-1") + "/v1/completions", fresh).status_code == 200
        try:
            reported = wait_holder(cluster, tokens_of(cluster, {"prompt": fresh["prompt"]}),
                                   "engine-1")
            break
        except AssertionError as exc:
            print(f"[controller restarted] {attempt} not reported: {exc}")
    assert reported, "no store on engine-1 after the restart reached the controller"
