"""Issue 11, defect 5: engines that answer 503, hang, refuse connections or die mid-answer,
behind a real mitmdump with the addon (no mocked mitmproxy)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import requests

from harness import Stubs

BODY = json.dumps({"model": "m", "prompt": "hello there"})


def _post(gw: Any, timeout: float = 10) -> requests.Response:
    return requests.post(gw.url + "/v1/completions", data=BODY, timeout=timeout)


def _completions_fail(engine: Any, status: int) -> None:
    """The engine answers /health 200 but every completion with ``status``."""
    serve = engine.serve

    def failing(h: Any, method: str, path: str, body: Any, raw: bytes) -> None:
        if path.startswith("/v1/"):
            h._send(status, {"detail": "overloaded"})
            return
        serve(h, method, path, body, raw)

    engine.serve = failing


def _quiet_fleet(stubs: Stubs, **kv: Any) -> dict[str, Any]:
    """Round robin (the rotation starts at vllm-1); no active checks unless asked."""
    return stubs.kvgate_config(**{"policy": "round_robin", "health_check_interval": 0,
                                  "metrics_interval": 0, **kv})


def _mode(stubs: Stubs) -> str:
    """A reverse target that accepts (only mitmproxy's opening of its listener needs it)."""
    return f"reverse:http://127.0.0.1:{stubs.ports['vllm-3']}"


def test_an_engine_answering_503_is_ejected_though_its_health_check_passes(
        stubs: Stubs, mitm) -> None:
    """Before: passive ejection knew only connect failures, and /health said 200, so a
    503-answering engine kept its share of traffic."""
    _completions_fail(stubs.engines["vllm-2"], 503)
    gw = mitm(_quiet_fleet(stubs, health_check_interval="1s",
                           outlier_detection={"consecutive_failures": 2,
                                              "base_ejection_time": "30s"}), mode=_mode(stubs))
    statuses = [(_post(gw).status_code) for _ in range(6)]  # vllm-2 gets 2 of them
    assert statuses.count(503) == 2
    time.sleep(2.5)  # passing health checks: they must not bring it back
    later = [_post(gw) for _ in range(12)]
    assert {r.status_code for r in later} == {200}
    assert {r.headers["x-kvcache-endpoint"] for r in later} == {"vllm-1", "vllm-3"}
    lines = [ln for ln in gw.log().splitlines() if "vllm-2 ejected" in ln]
    assert len(lines) == 1 and "2 failed answers in a row" in lines[0]


def test_a_hung_engine_gets_the_client_a_clear_504(stubs: Stubs, mitm) -> None:
    """Before: mitmproxy has no upstream read timeout: the client waited forever."""
    stubs.engines["vllm-1"].delay = 20.0
    gw = mitm(_quiet_fleet(stubs, response_headers_timeout="1s",
                           outlier_detection={"consecutive_failures": 1}), mode=_mode(stubs))
    t0 = time.monotonic()
    r = _post(gw, timeout=15)  # the rotation starts at vllm-1
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert "sent no response headers within 1s" in r.json()["error"]["message"]
    assert 0.9 < took < 4.0
    # the engine is suspected (here: ejected at the first failure), the rest serve
    assert {_post(gw).headers["x-kvcache-endpoint"] for _ in range(4)} == {"vllm-2", "vllm-3"}
    lines = [ln for ln in gw.log().splitlines() if "vllm-1 ejected" in ln]
    assert len(lines) == 1 and "no response headers" in lines[0]


def test_a_refused_connect_goes_to_another_engine(stubs: Stubs, mitm) -> None:
    """Before: each request routed to a dead engine before its ejection got a 502."""
    stubs.engines["vllm-2"].stop()  # nothing listens on its port now
    gw = mitm(_quiet_fleet(stubs), mode=_mode(stubs))  # only the request path can tell
    answers = [_post(gw) for _ in range(9)]
    assert [r.status_code for r in answers] == [200] * 9
    assert "vllm-2" not in {r.headers["x-kvcache-endpoint"] for r in answers}
    assert "vllm-2" not in {r.json()["engine"] for r in answers}
    lines = [ln for ln in gw.log().splitlines() if "vllm-2 ejected" in ln]
    assert len(lines) == 1 and "refused" in lines[0]  # one event, one line


def test_a_dead_reverse_target_costs_no_request(stubs: Stubs, mitm) -> None:
    """mitmproxy's default connects every client connection to the reverse target before
    a request is read; kvgate routes per request, so it sets connection_strategy=lazy:
    with the target's engine gone, requests go where kvgate sends them."""
    stubs.engines["vllm-1"].stop()
    gw = mitm(_quiet_fleet(stubs), mode=f"reverse:http://127.0.0.1:{stubs.ports['vllm-1']}")
    statuses = [_post(gw).status_code for _ in range(6)]
    assert statuses == [200] * 6
    assert "connection_strategy set to lazy" in gw.log()


def test_mitmproxy_itself_cannot_retry_a_failed_connect(stubs: Stubs, mitm) -> None:
    """Why the connect is checked before mitmproxy's own: once mitmproxy's connect fails,
    its error hook runs (the engine is ejected there) but the 502 goes to the client
    whatever the hook does; the flow cannot be sent anywhere else."""
    stubs.engines["vllm-2"].stop()
    gw = mitm(_quiet_fleet(stubs, retry_refused_connects=False), mode=_mode(stubs))
    statuses = [_post(gw).status_code for _ in range(6)]
    assert statuses.count(502) == 1  # the one routed there before the ejection
    lines = [ln for ln in gw.log().splitlines() if "vllm-2 ejected" in ln]
    assert len(lines) == 1


def _resetting_engine() -> tuple[socket.socket, int]:
    """Reads a request, sends half an answer and closes: an engine killed mid-answer."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"GET /health"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"partial")

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_answers_cut_short_count_as_failures(stubs: Stubs, mitm) -> None:
    srv, port = _resetting_engine()
    try:
        cfg = _quiet_fleet(stubs, outlier_detection={"consecutive_failures": 2})
        cfg["clusters"][0]["endpoints"][1]["socket_address"]["port"] = port  # vllm-2
        gw = mitm(cfg, mode=_mode(stubs))
        codes = [_post(gw).status_code for _ in range(6)]
        assert codes.count(502) == 2  # the two cut short; then it is out
        assert [_post(gw).status_code for _ in range(6)] == [200] * 6
        lines = [ln for ln in gw.log().splitlines() if "vllm-2 ejected" in ln]
        assert len(lines) == 1
    finally:
        srv.close()
