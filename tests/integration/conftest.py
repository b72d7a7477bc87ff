"""Fixtures: in-process loopback stubs and real mitmdump subprocesses with the addon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvgate.sim.stub import StubController, StubEngine

from harness import Gateway, Stubs, start_mitmdump


@pytest.fixture
def stubs() -> Iterator[Stubs]:
    ctl = StubController()
    ctl_port = ctl.start()
    engines: dict[str, StubEngine] = {}
    ports: dict[str, int] = {}
    for i in (1, 2, 3):
        eid = f"vllm-{i}"
        engines[eid] = StubEngine(eid)
        ports[eid] = engines[eid].start()
    yield Stubs(ctl, ctl_port, engines, ports)
    for e in engines.values():
        e.stop()
    ctl.stop()


@pytest.fixture
def mitm(tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def start(config: dict[str, Any] | str, mode: str | None = "reverse:http://127.0.0.1:9",
              **kw: Any) -> Gateway:
        gw = start_mitmdump(tmp_path, config, mode=mode, **kw)
        started.append(gw)
        return gw

    yield start
    for gw in started:  # every one stopped before any is judged: none outlives the test
        gw.stop()
    for gw in started:
        assert not kvgate_tracebacks(gw.log()), gw.log()[-3000:]


def kvgate_tracebacks(log: str) -> list[str]:
    """Tracebacks in a mitmdump log, but mitmproxy's own at shutdown: a client connection
    still open when SIGINT arrives logs its handler's CancelledError (no kvgate frame)."""
    blocks = log.split("Traceback (most recent call last):")[1:]
    return [b for b in blocks
            if not ("CancelledError" in b and "kvgate" not in b and "mitmproxy" in b)]
