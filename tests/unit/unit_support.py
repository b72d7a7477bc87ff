"""Helpers shared by the unit tests: a fake clock, steerable stub subclasses, config docs.

Imported by name (``from unit_support import ...``) rather than from conftest, because
tests/integration has a conftest module of its own.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

from kvgate.clients import http as kvclient
from kvgate.config import KVCacheConfig
from kvgate.sim.stub import StubApp, StubController, StubEngine


class FakeClock:
    """An injectable monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RawEngine(StubEngine):
    """A StubEngine that also keeps the exact bytes each /tokenize call carried."""

    def __init__(self, engine_id: str = "vllm-1") -> None:
        super().__init__(engine_id)
        self.raw_tokenize: list[bytes] = []
        self.url = ""

    def handle(self, h: Any, method: str, path: str, body: bytes) -> None:
        if path == "/tokenize":
            with self.lock:
                self.raw_tokenize.append(body)
        super().handle(h, method, path, body)


class ScriptedController(StubController):
    """A StubController with per-path scripted failures, an optional fixed /lookup
    answer and, when asked, an /evict endpoint (the real controller has none)."""

    def __init__(self) -> None:
        super().__init__()
        self.script: dict[str, list[int]] = {}
        self.layout: dict[str, int] | None = None
        self.has_evict = False
        self.url = ""
        self.peers: list[int] = []  # client port of each call: one per connection used
        self.handlers: list[Any] = []  # the request handler of each call (its socket)

    def matched(self, query: list[int]) -> dict[str, int]:
        if self.layout is not None:
            return dict(self.layout)
        return super().matched(query)

    def serve(self, h: Any, method: str, path: str, body: Any, raw: bytes) -> None:
        with self.lock:
            self.peers.append(h.client_address[1])
            self.handlers.append(h)
            queue = self.script.get(path)
            status = queue.pop(0) if queue else 0
        if status:
            h._send(status, {"detail": "scripted failure"})
            return
        if path == "/evict" and self.has_evict and method == "POST" and isinstance(body, dict):
            h._send(200, {"event_id": "evt-evict", "num_tokens": len(body.get("tokens") or [])})
            return
        super().serve(h, method, path, body, raw)


def calls(stub: StubApp, path: str) -> list[Any]:
    """JSON bodies of the calls the stub recorded on one path, in arrival order."""
    with stub.lock:
        return [b for _, p, b in stub.calls if p == path]


def paths(stub: StubApp) -> list[str]:
    """Every path the stub was called on, in arrival order (control calls excluded)."""
    with stub.lock:
        return [p for _, p, _ in stub.calls]


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def stop_soon(app: StubApp) -> None:
    """Stop a stub without waiting for serve_forever's 0.5 s poll."""
    threading.Thread(target=app.stop, daemon=True).start()


def quiet(app: StubApp) -> None:
    """No tracebacks on stderr when a client gave up before the stub answered."""
    assert app.httpd is not None
    app.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]


def make_transport(cfg: KVCacheConfig | None = None) -> Any:
    """The HTTP transport the gateway gives its HelperClients."""
    return kvclient.make_pool(cfg or KVCacheConfig())


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def gateway_doc(
    engine_url: str,
    controller_url: str,
    kvcache: dict[str, Any] | None = None,
    endpoint_ids: tuple[str, ...] = ("vllm-1", "vllm-2", "vllm-3"),
) -> dict[str, Any]:
    """A kvgate-shape config document pointing at the in-process stubs."""
    kv = {
        "vllm_endpoint": engine_url,
        "lmcache_endpoint": controller_url,
        "default_model": "stub-model",
        "lookup_routing_timeout": "1s",
        "request_timeout": "2s",
        "retry": {"max_attempts": 3, "base_backoff": "5ms", "max_backoff": "10ms"},
        # the endpoints here are addresses nobody listens on: no active checks
        "health_check_interval": 0,
        "metrics_interval": 0,
        # one lookup per request, as most tests count them (test_lookup_cache sets it)
        "lookup_cache_ttl": 0,
        # LMCache's answer alone decides (test_recent_routes sets it)
        "recent_routes_window": 0,
    }
    return {
        "kvcache": merge(kv, kvcache or {}),
        "clusters": [
            {
                "name": "vllm",
                "endpoints": [
                    {"id": ep_id, "socket_address": {"address": "127.0.0.1", "port": 18001 + i}}
                    for i, ep_id in enumerate(endpoint_ids)
                ],
            }
        ],
    }
