"""Issue 11, defect 6: a listener on every interface is warned about; in regular proxy
mode an engine is recognised by its address, however the client spells it."""

from __future__ import annotations

import json
import logging

import pytest
import requests
import yaml
from mitmproxy.test import taddons

from kvgate.addon import KVCacheAddon

from harness import Stubs


def test_localhost_is_the_same_engine_as_127_0_0_1(stubs: Stubs, mitm) -> None:
    """Before: only the configured spelling (127.0.0.1) was routed; localhost:PORT passed
    through untouched, unbalanced and unrouted."""
    stubs.controller.holdings = {"vllm-3": [[4, 4, 4]]}
    gw = mitm(stubs.kvgate_config(), mode=None)
    proxies = {"http": gw.url}
    body = json.dumps({"model": "m", "prompt": [4, 4, 4]})
    for host in ("localhost", "127.0.0.1"):
        r = requests.post(f"http://{host}:{stubs.ports['vllm-1']}/v1/completions",
                          data=body, proxies=proxies, timeout=10)
        assert r.headers.get("x-kvcache-route") == "cache", host
        assert r.json()["engine"] == "vllm-3"
    # another port on the same address is not an engine
    r = requests.post(f"http://localhost:{gw.port}/v1/completions", data=body,
                      proxies=proxies, timeout=10)
    assert "x-kvcache-route" not in r.headers


@pytest.mark.parametrize(("listen_host", "mode", "warned"), [
    ("", "reverse:http://127.0.0.1:9", True),
    ("0.0.0.0", "regular", True),
    ("127.0.0.1", "reverse:http://127.0.0.1:9", False),
    ("127.0.0.1", "regular@0.0.0.0:8080", True),  # a mode can bind elsewhere itself
])
def test_one_warning_when_listening_on_all_interfaces(stubs: Stubs, tmp_path, caplog,
                                                      listen_host: str, mode: str,
                                                      warned: bool) -> None:
    path = tmp_path / "kvgate.yaml"
    path.write_text(yaml.safe_dump(stubs.kvgate_config(health_check_interval=0,
                                                       metrics_interval=0)))
    addon = KVCacheAddon()
    with taddons.context(addon) as tctx, caplog.at_level(logging.WARNING, "kvgate"):
        tctx.options.listen_host = listen_host
        tctx.options.mode = [mode]
        tctx.configure(addon, kvcache_config=str(path))
        addon.running()
        addon.done()
    lines = [r for r in caplog.records if "all interfaces" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert "--listen-host 127.0.0.1" in lines[0].getMessage()
