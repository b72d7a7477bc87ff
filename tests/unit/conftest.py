"""Fixtures for the unit suite: a fake clock, loopback stubs, LMCache clients, gateways."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvgate.clients.breaker import CircuitBreaker
from kvgate.clients.http import HelperClient
from kvgate.clients.lmcache import LMCacheClient
from kvgate.config import RetryConfig, from_mapping
from kvgate.gateway import Gateway

from unit_support import (
    FakeClock,
    RawEngine,
    ScriptedController,
    gateway_doc,
    make_transport,
    quiet,
    stop_soon,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine() -> Iterator[RawEngine]:
    eng = RawEngine("vllm-1")
    eng.url = f"http://127.0.0.1:{eng.start()}"
    quiet(eng)
    yield eng
    stop_soon(eng)


@pytest.fixture
def controller() -> Iterator[ScriptedController]:
    ctl = ScriptedController()
    ctl.url = f"http://127.0.0.1:{ctl.start()}"
    quiet(ctl)
    yield ctl
    stop_soon(ctl)


@pytest.fixture
def lmcache_factory(controller: ScriptedController) -> Callable[..., LMCacheClient]:
    """LMCacheClient against the scripted controller, with its own breaker and retry."""

    def make(
        max_attempts: int = 1,
        base_backoff: float = 0.001,
        max_backoff: float = 0.002,
        breaker: CircuitBreaker | None = None,
    ) -> LMCacheClient:
        cb = breaker if breaker is not None else CircuitBreaker("lmcache", 5, 10.0, 2)
        retry = RetryConfig(max_attempts, base_backoff, max_backoff)
        return LMCacheClient(HelperClient("lmcache", controller.url, make_transport(), cb, retry))

    return make


@pytest.fixture
def make_gateway(
    engine: RawEngine, controller: ScriptedController
) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(kvcache: dict[str, Any] | None = None,
             endpoint_ids: tuple[str, ...] = ("vllm-1", "vllm-2", "vllm-3")) -> Gateway:
        gw = Gateway(from_mapping(gateway_doc(engine.url, controller.url, kvcache, endpoint_ids)))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()
