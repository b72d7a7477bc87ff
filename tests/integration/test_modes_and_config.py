"""Regular proxy mode, config errors at start and while running, the stats command."""

from __future__ import annotations

import json

import pytest
import requests
import yaml
from mitmproxy import exceptions
from mitmproxy.test import taddons

from kvgate.addon import KVCacheAddon
from kvgate.sim.stub import StubEngine

from harness import Stubs, start_mitmdump


def test_regular_proxy_routes_only_our_engines_and_virtual_hosts(stubs: Stubs, mitm) -> None:
    stubs.controller.holdings = {"vllm-3": [[4, 4, 4]]}
    other = StubEngine("outsider")
    other_port = other.start()
    try:
        gw = mitm(stubs.kvgate_config(virtual_hosts=["llm.internal"]), mode=None)
        proxies = {"http": gw.url}
        body = json.dumps({"model": "m", "prompt": [4, 4, 4]})
        # aimed at one of our engines: routed by cache to vllm-3
        r = requests.post(f"http://127.0.0.1:{stubs.ports['vllm-1']}/v1/completions",
                          data=body, proxies=proxies, timeout=10)
        assert r.headers["x-kvcache-endpoint"] == "vllm-3"
        assert r.json()["engine"] == "vllm-3"
        # aimed at a virtual host: routed too
        r = requests.post("http://llm.internal/v1/completions", data=body, proxies=proxies,
                          timeout=10)
        assert r.json()["engine"] == "vllm-3"
        # anything else passes untouched
        r = requests.post(f"http://127.0.0.1:{other_port}/v1/completions", data=body,
                          proxies=proxies, timeout=10)
        assert r.json()["engine"] == "outsider"
        assert "x-kvcache-route" not in r.headers
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"lookup_routing_timeout": "soon"}, "lookup_routing_timeout"),
        ({"cache_strategy": {"load_threshold": 1.5}}, "cache_strategy.load_threshold"),
        ({"token_cache": {"max_size": "big"}}, "token_cache.max_size"),
    ],
)
def test_config_error_stops_mitmdump_with_one_line(stubs: Stubs, tmp_path, patch, field) -> None:
    cfg = stubs.kvgate_config(**patch)
    gw = start_mitmdump(tmp_path, cfg, mode="reverse:http://127.0.0.1:9", wait=False)
    assert gw.proc.wait(30) == 1
    lines = [line for line in gw.log().splitlines() if "config error" in line]
    assert len(lines) == 1 and field in lines[0]
    assert "Traceback" not in gw.log()


def test_empty_config_file_is_refused_at_start(tmp_path) -> None:
    gw = start_mitmdump(tmp_path, "", mode="reverse:http://127.0.0.1:9", wait=False)
    assert gw.proc.wait(30) == 1  # an empty file is not a mapping
    assert "config error" in gw.log()
    assert "Traceback" not in gw.log()


def test_bad_config_while_running_is_refused_and_old_one_stays(stubs: Stubs, tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(stubs.kvgate_config()))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(stubs.kvgate_config(retry={"max_attempts": -1})))
    addon = KVCacheAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, kvcache_config=str(good))
        before = addon.gateway
        assert before is not None
        addon.running()
        with pytest.raises(exceptions.OptionsError, match="retry.max_attempts"):
            tctx.configure(addon, kvcache_config=str(bad))
        assert addon.gateway is before
        assert tctx.options.kvcache_config == str(good)
        stats = json.loads(addon.stats())
        assert stats["enabled"] is True
        assert {"token_cache", "breakers", "counters", "background"} <= set(stats)
        assert stats["breakers"]["lmcache"]["state"] == "closed"
        addon.done()




def test_reload_keeps_the_admin_port_and_a_taken_port_is_refused(stubs: Stubs,
                                                                 tmp_path) -> None:
    import socket
    import threading

    import requests

    from kvgate.sim.ports import free_port

    port = free_port()
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(stubs.kvgate_config(metrics_port=port)))
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(stubs.kvgate_config(metrics_port=port, queue_ms=30)))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = tmp_path / "taken.yaml"
    taken.write_text(yaml.safe_dump(stubs.kvgate_config(metrics_port=blocker.getsockname()[1])))
    addon = KVCacheAddon()
    try:
        with taddons.context(addon) as tctx:
            tctx.configure(addon, kvcache_config=str(first))
            addon.running()
            tctx.configure(addon, kvcache_config=str(second))  # same port: freed, reopened
            assert addon.gateway is not None and addon.gateway.kv.queue_ms == 30
            url = f"http://127.0.0.1:{port}/metrics"
            assert "kvgate_routing_decisions_total" in requests.get(url, timeout=5).text
            before = addon.gateway
            with pytest.raises(exceptions.OptionsError, match="metrics_port"):
                tctx.configure(addon, kvcache_config=str(taken))
            assert addon.gateway is before
            assert "kvgate_routing_decisions_total" in requests.get(url, timeout=5).text
            # a host name that cannot even be resolved: refused the same way, no threads left
            badhost = tmp_path / "badhost.yaml"
            badhost.write_text(yaml.safe_dump(stubs.kvgate_config(
                metrics_port=free_port(), metrics_host="a..b")))
            monitors = sum(t.name == "kvgate-monitor" for t in threading.enumerate())
            with pytest.raises(exceptions.OptionsError, match="metrics_port"):
                tctx.configure(addon, kvcache_config=str(badhost))
            assert addon.gateway is before
            assert sum(t.name == "kvgate-monitor" for t in threading.enumerate()) == monitors
            assert "kvgate_routing_decisions_total" in requests.get(url, timeout=5).text
            addon.done()
    finally:
        blocker.close()
