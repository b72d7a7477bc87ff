"""End to end: real mitmdump + addon in reverse mode in front of loopback stubs."""

from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from mitmproxy import io as mitmio

from kvgate.sim.stub import StubEngine, tokenize_text

from harness import Stubs


def reverse(stubs: Stubs) -> str:
    return f"reverse:http://127.0.0.1:{stubs.ports['vllm-1']}"


def test_routes_to_the_instance_holding_the_longest_prefix(stubs: Stubs, mitm) -> None:
    prompt = " ".join(f"w{i}" for i in range(600))
    tokens = tokenize_text(prompt)
    stubs.controller.holdings = {"vllm-2": [tokens[:300]], "vllm-3": [tokens[:520]]}
    gw = mitm(stubs.kvgate_config(), mode=reverse(stubs))
    r = gw.post("/v1/completions?trace=1", {"model": "m", "prompt": prompt})
    assert r.status_code == 200
    assert r.headers["x-kvcache-route"] == "cache"
    assert r.headers["x-kvcache-endpoint"] == "vllm-3"
    assert r.headers["x-kvcache-matched-tokens"] == "512"  # whole chunks of 256 only
    body = r.json()
    assert body["engine"] == "vllm-3"
    # Host header names the chosen endpoint; path and query are kept.
    assert body["host"] == f"127.0.0.1:{stubs.ports['vllm-3']}"
    paths = [p for m, p, _ in stubs.calls("vllm-3") if m == "POST"]
    assert "/v1/completions?trace=1" in paths


def test_first_sight_routes_and_seed_mode_waits_for_a_repeat(stubs: Stubs, mitm) -> None:
    prompt = "a long shared system prompt " * 20
    stubs.controller.holdings = {"vllm-2": [tokenize_text(prompt)]}
    gw = mitm(stubs.kvgate_config(), mode=reverse(stubs))
    r = gw.post("/v1/completions", {"model": "m", "prompt": prompt})
    assert (r.headers["x-kvcache-route"], r.headers["x-kvcache-endpoint"]) == ("cache", "vllm-2")

    seed = mitm(stubs.kvgate_config(route_on_miss=False), mode=reverse(stubs))
    first = seed.post("/v1/completions", {"model": "m", "prompt": prompt})
    assert first.headers["x-kvcache-route"] == "balancer"
    # the background task tokenizes; the repeat then routes like the seed does
    deadline = time.monotonic() + 5
    while True:
        again = seed.post("/v1/completions", {"model": "m", "prompt": prompt})
        if again.headers["x-kvcache-route"] == "cache" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert again.headers["x-kvcache-endpoint"] == "vllm-2"
    assert again.headers["x-kvcache-route"] == "cache"


def test_token_id_prompts_route_without_tokenize(stubs: Stubs, mitm) -> None:
    ids = list(range(1000, 1300))
    stubs.controller.holdings = {"vllm-1": [ids]}
    gw = mitm(stubs.kvgate_config(), mode=reverse(stubs))
    r = gw.post("/v1/completions", {"model": "m", "prompt": ids})
    assert r.headers["x-kvcache-endpoint"] == "vllm-1"
    assert r.headers["x-kvcache-matched-tokens"] == "300"
    time.sleep(0.3)  # let the background task run
    assert not [p for e in stubs.engines for _, p, _ in stubs.calls(e) if p == "/tokenize"]


def test_streaming_is_not_buffered(stubs: Stubs, mitm) -> None:
    for e in stubs.engines.values():
        e.stream_chunks, e.stream_gap = 4, 0.4
    gw = mitm(stubs.kvgate_config(), mode=reverse(stubs))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    t0 = time.monotonic()
    with gw.post("/v1/chat/completions", body, stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        t_first = time.monotonic() - t0
        rest = [line for line in lines if line]
    total = time.monotonic() - t0
    assert first.startswith(b"data: {")
    assert rest[-1] == b"data: [DONE]"
    assert total >= 1.5  # 4 gaps of 0.4 s: the engine really streamed
    assert t_first < total / 2, (t_first, total)


def test_slow_lookups_do_not_queue_behind_each_other(stubs: Stubs, mitm) -> None:
    stubs.controller.delay = 0.4
    stubs.controller.record = False
    gw = mitm(stubs.kvgate_config(lookup_routing_timeout="2s"), mode=reverse(stubs))
    prompt_ids = [[7, 8, 9, i] for i in range(32)]
    gw.post("/v1/completions", {"model": "m", "prompt": [1, 2]})  # warm up
    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(
            lambda ids: gw.post("/v1/completions", {"model": "m", "prompt": ids}), prompt_ids))
    elapsed = time.monotonic() - t0
    assert all(r.status_code == 200 for r in results)
    # 32 lookups of 0.4 s each, run one after another, would take 12.8 s; a small pool
    # (the default executor's 6 threads) about 2.4 s; concurrently about 0.4 s (a loaded
    # 2-core machine adds most of a second to that).
    assert elapsed < 1.6, elapsed


def test_bad_input_reaches_an_engine_exactly_as_sent(stubs: Stubs, mitm) -> None:
    gw = mitm(stubs.kvgate_config(max_body_bytes=4096), mode=reverse(stubs))
    cases: list[tuple[bytes, dict[str, str]]] = [
        (b"not json at all", {}),
        (b"[1, 2, 3]", {}),
        (b'{"model": 5, "prompt": {"x": 1}}', {}),
        (b'{"model": "m", "prompt": "   "}', {}),
        (b'{"model": "m", "messages": "nope"}', {}),
        (b'{"model": "m", "prompt": [true, false]}', {}),
        (json.dumps({"model": "m", "prompt": "x" * 10_000}).encode(), {}),
        (gzip.compress(b'{"model": "m", "prompt": "zipped"}'), {"content-encoding": "gzip"}),
        (b"\xff\xfe\x00garbage", {}),
    ]
    for body, headers in cases:
        for e in stubs.engines.values():
            e.calls.clear()
        r = requests.post(gw.url + "/v1/completions", data=body, headers=headers, timeout=10)
        assert r.status_code in (200, 400), (body[:40], r.status_code)
        assert r.headers["x-kvcache-route"] == "balancer"
        received = [b for e in stubs.engines for m, p, b in stubs.calls(e)
                    if p == "/v1/completions"]
        assert len(received) == 1
        got = received[0]
        expected = json.loads(body) if not isinstance(got, bytes) else body
        assert got == expected
    r = requests.get(gw.url + "/some/unknown/path?q=1", timeout=10)
    assert r.status_code == 200
    assert r.json()["path"] == "/some/unknown/path?q=1"
    assert r.headers["x-kvcache-route"] == "balancer"


def test_enabled_false_is_a_pass_through_to_the_balancer(stubs: Stubs, mitm) -> None:
    stubs.controller.holdings = {"vllm-3": [[1, 2, 3]]}
    gw = mitm(stubs.kvgate_config(enabled=False), mode=reverse(stubs))
    seen = set()
    for _ in range(3):
        r = gw.post("/v1/completions", {"model": "m", "prompt": [1, 2, 3]})
        assert r.headers["x-kvcache-route"] == "disabled"
        seen.add(r.json()["engine"])
    assert seen == {"vllm-1", "vllm-2", "vllm-3"}  # round robin
    time.sleep(0.2)
    assert stubs.controller_calls() == []


def test_keeps_serving_when_the_controller_is_down(stubs: Stubs, mitm) -> None:
    stubs.controller.stop()
    gw = mitm(stubs.kvgate_config(lookup_routing_timeout="100ms",
                                  circuit_breaker={"failure_threshold": 2}),
              mode=reverse(stubs))
    routes = []
    for i in range(8):
        r = gw.post("/v1/completions", {"model": "m", "prompt": [1, 2, i]})
        assert r.status_code == 200
        routes.append(r.headers["x-kvcache-route"])
    assert set(routes) == {"fallback"}


def test_flows_carry_metadata_and_comment(stubs: Stubs, mitm) -> None:
    stubs.controller.holdings = {"vllm-2": [[5, 6, 7, 8]]}
    gw = mitm(stubs.kvgate_config(), mode=reverse(stubs))
    gw.post("/v1/completions", {"model": "m", "prompt": [5, 6, 7, 8]})
    gw.stop()
    with open(gw.flows_path, "rb") as fh:
        flows = list(mitmio.FlowReader(fh).stream())
    assert len(flows) == 1
    meta = flows[0].metadata["kvcache"]
    assert meta["endpoint"] == "vllm-2" and meta["route"] == "cache"
    assert meta["matched_tokens"] == 4
    assert "cache -> vllm-2" in flows[0].comment


def test_prompt_text_never_logged_at_info(stubs: Stubs, mitm) -> None:
    secret = "zebra-secret-7731"
    for e in stubs.engines.values():
        e.status = 500  # make tokenize fail so warnings get logged
    gw = mitm(stubs.kvgate_config(), mode=reverse(stubs))
    gw.post("/v1/completions", {"model": "m", "prompt": f"tell me about {secret}"})
    gw.post("/v1/completions", b'{"model": "m", "prompt": "' + secret.encode() + b'"')
    time.sleep(0.3)
    gw.stop()
    log = gw.log()
    assert "[kvcache]" in log
    assert secret not in log


def test_passive_ejection_of_a_dead_endpoint(stubs: Stubs, mitm) -> None:
    cfg = stubs.kvgate_config(health_check_interval=0)  # passive only
    dead = {"id": "vllm-dead", "socket_address": {"address": "127.0.0.1", "port": 9}}
    cfg["clusters"][0]["endpoints"].append(dead)
    gw = mitm(cfg, mode=reverse(stubs))
    statuses = [gw.post("/v1/completions", {"model": "m", "prompt": [i]}).status_code
                for i in range(12)]
    # issue 11: the request routed there never reached it (refused): it went elsewhere
    assert statuses.count(502) == 0
    assert gw.log().count("vllm-dead ejected") == 1


def test_active_health_checks_eject_within_2s_and_readmit(stubs: Stubs, mitm) -> None:
    gw = mitm(stubs.kvgate_config(health_check_interval="300ms"), mode=reverse(stubs))
    port = stubs.ports["vllm-2"]
    stubs.engines["vllm-2"].stop()
    time.sleep(2.0)
    engines = [gw.post("/v1/completions", {"model": "m", "prompt": [i]}).json()["engine"]
               for i in range(9)]
    assert "vllm-2" not in engines
    assert set(engines) == {"vllm-1", "vllm-3"}
    revived = StubEngine("vllm-2")
    revived.start(port)
    try:
        time.sleep(2.0)
        engines = [gw.post("/v1/completions", {"model": "m", "prompt": [i]}).json()["engine"]
                   for i in range(9)]
        assert "vllm-2" in engines
    finally:
        revived.stop()
    assert "vllm-2 failed its health check" in gw.log()


def test_without_lmcache_a_conversation_stays_on_its_engine(stubs: Stubs, mitm) -> None:
    stubs.controller.stop()
    gw = mitm(stubs.kvgate_config(lookup_routing_timeout="100ms"), mode=reverse(stubs))
    history = "system: " + " ".join(f"rule{i}" for i in range(300))
    served = set()
    for turn in range(5):
        history += f" user: question {turn}"
        r = gw.post("/v1/completions", {"model": "m", "prompt": history})
        assert r.headers["x-kvcache-route"] == "fallback"
        served.add(r.json()["engine"])
        history += " assistant: " + r.json()["choices"][0]["text"]
    assert len(served) == 1  # round robin would have visited all three


def test_prometheus_metrics_on_the_admin_port(stubs: Stubs, mitm) -> None:
    from kvgate.sim.ports import free_port

    stubs.controller.holdings = {"vllm-2": [[9, 9, 9, 9]]}
    port = free_port()
    gw = mitm(stubs.kvgate_config(metrics_port=port, lookup_cache_ttl="10s"),
              mode=reverse(stubs))
    for _ in range(3):
        gw.post("/v1/completions", {"model": "m", "prompt": [9, 9, 9, 9]})
    gw.post("/v1/completions", b"not json")
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'kvgate_routing_decisions_total{reason="cache"} 3.0' in text
    assert 'kvgate_routing_decisions_total{reason="balancer"} 1.0' in text
    # one lookup; the two repeats reuse its answer within lookup_cache_ttl
    assert "kvgate_lookup_seconds_count 1.0" in text
    assert 'kvgate_helper_calls_total{helper="lookup",result="reused"} 2.0' in text
    assert 'kvgate_breaker_state{breaker="lmcache"} 0.0' in text
    assert 'kvgate_endpoint_healthy{cluster="vllm",endpoint="vllm-2"} 1.0' in text
    assert "kvgate_background_queue_depth" in text
    assert "kvgate_token_cache_hit_ratio" in text
    assert "kvgate_matched_token_ratio_bucket" in text


def test_a_stale_answer_routes_without_waiting_and_is_renewed(stubs: Stubs, mitm) -> None:
    """Through mitmdump: after lookup_cache_ttl, a repeat routes on the old answer at once
    while the gateway renews it; a slow controller does not slow the repeat."""
    from kvgate.sim.ports import free_port

    stubs.controller.holdings = {"vllm-3": [[7, 7, 7, 7, 7]]}
    port = free_port()
    gw = mitm(stubs.kvgate_config(metrics_port=port, lookup_cache_ttl="200ms",
                                  lookup_stale_ttl="30s", lookup_routing_timeout="2s"),
              mode=reverse(stubs))
    body = {"model": "m", "prompt": [7, 7, 7, 7, 7]}
    assert gw.post("/v1/completions", body).json()["engine"] == "vllm-3"
    time.sleep(0.3)  # the answer is now stale
    stubs.controller.delay = 1.0  # renewals take a second
    t0 = time.monotonic()
    r = gw.post("/v1/completions", body)
    took = time.monotonic() - t0
    assert r.headers["x-kvcache-route"] == "cache"
    assert r.json()["engine"] == "vllm-3"
    assert took < 0.8  # it did not wait for the renewal
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        if 'kvgate_helper_calls_total{helper="lookup",result="renewed"} 1.0' in text:
            break
        time.sleep(0.1)
    assert 'kvgate_helper_calls_total{helper="lookup",result="stale"} 1.0' in text
    assert 'kvgate_helper_calls_total{helper="lookup",result="renewed"} 1.0' in text


def test_the_policy_is_chosen_by_name_in_the_config(stubs: Stubs, mitm) -> None:
    prompt = " ".join(f"p{i}" for i in range(600))
    stubs.controller.holdings = {"vllm-3": [tokenize_text(prompt)]}
    loadaware = mitm(stubs.kvgate_config(policy="loadaware",
                                          policies={"loadaware": {"beta": 0.5}}),
                     mode=reverse(stubs))
    r = loadaware.post("/v1/completions", {"model": "m", "prompt": prompt})
    assert (r.headers["x-kvcache-route"], r.headers["x-kvcache-endpoint"]) == ("cache", "vllm-3")
    lookups = len(stubs.controller_calls("/lookup"))

    # SGLang-style cache_aware matches text it has routed, never asking LMCache
    cache_aware = mitm(stubs.kvgate_config(policy="cache_aware"), mode=reverse(stubs))
    first = cache_aware.post("/v1/completions", {"model": "m", "prompt": prompt})
    second = cache_aware.post("/v1/completions", {"model": "m", "prompt": prompt + " more"})
    assert first.headers["x-kvcache-route"] == "balancer"
    assert second.headers["x-kvcache-route"] == "cache"
    assert second.headers["x-kvcache-endpoint"] == first.headers["x-kvcache-endpoint"]
    assert len(stubs.controller_calls("/lookup")) == lookups
