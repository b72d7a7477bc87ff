"""Active health checks (fleet.engine_metrics): a refused connection ejects at once, a
slow or failing /health only after UNHEALTHY_AFTER checks in a row, a pass readmits.
Against a real HTTP server on 127.0.0.1 whose /health answers as the test says."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvgate.fleet.endpoint import Endpoint
from kvgate.fleet.engine_metrics import UNHEALTHY_AFTER, EngineMonitor
from kvgate.fleet.health import HealthBook


class _Health:
    status = 200
    delay = 0.0


@pytest.fixture
def server() -> Iterator[tuple[ThreadingHTTPServer, type[_Health]]]:
    class Answer(_Health):
        pass

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            time.sleep(Answer.delay)
            self.send_response(Answer.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, Answer
    srv.shutdown()
    srv.server_close()


def _monitor(port: int) -> tuple[EngineMonitor, HealthBook, Endpoint]:
    ep = Endpoint("e1", "127.0.0.1", port)
    book = HealthBook()
    return EngineMonitor([ep], book, health_interval=0.2, metrics_interval=0), book, ep


def test_one_slow_answer_does_not_eject_but_slow_in_a_row_does(server) -> None:
    srv, answer = server
    monitor, book, ep = _monitor(srv.server_address[1])
    answer.delay = 0.5  # past the 0.2 s check timeout
    for _ in range(UNHEALTHY_AFTER - 1):
        monitor.check_health(ep)
    assert book.is_healthy("e1")  # a busy engine, not a dead one
    monitor.check_health(ep)
    assert not book.is_healthy("e1")
    answer.delay = 0.0
    monitor.check_health(ep)
    assert book.is_healthy("e1")


def test_a_pass_in_between_resets_the_count(server) -> None:
    srv, answer = server
    monitor, book, ep = _monitor(srv.server_address[1])
    for _ in range(3):
        answer.status = 503
        for _ in range(UNHEALTHY_AFTER - 1):
            monitor.check_health(ep)
        answer.status = 200
        monitor.check_health(ep)
    assert book.is_healthy("e1") and book.ejections == 0


def test_a_refused_connection_ejects_at_once() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monitor, book, ep = _monitor(port)
    monitor.check_health(ep)
    assert not book.is_healthy("e1") and book.ejections == 1
