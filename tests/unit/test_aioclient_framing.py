"""The request-path client's HTTP/1.1 framing, against canned answers from a raw server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from kvgate.clients.aio_http import AsyncHelper
from kvgate.clients.breaker import CircuitBreaker
from kvgate.clients.http import CallError

JSON = b'{"ok": true}'


def _run(answers: list[bytes], calls: int = 1, close_after: bool = False,
         timeout: float = 2.0) -> tuple[list[object], list[bytes], int]:
    """Serve ``answers`` (one per request, in order); returns results, requests, accepts."""
    requests: list[bytes] = []
    accepts = 0

    async def main() -> list[object]:
        nonlocal accepts

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepts
            accepts += 1
            while answers:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                requests.append(head + await reader.readexactly(length))
                writer.write(answers.pop(0))
                await writer.drain()
                if close_after:
                    break
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        helper = AsyncHelper("t", f"http://127.0.0.1:{port}", CircuitBreaker("t", 5, 10, 2))
        out: list[object] = []
        for _ in range(calls):
            try:
                out.append(await helper.post("/x", b'{"a": 1}', timeout))
            except CallError as exc:
                out.append(exc)
        helper.close()
        server.close()
        return out

    return asyncio.run(main()), requests, accepts


def _answer(head: str, body: bytes = JSON) -> bytes:
    return head.encode() + b"\r\n\r\n" + body


def test_content_length_keep_alive_reuses_one_connection() -> None:
    ans = _answer(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(JSON)}")
    results, reqs, accepts = _run([ans, ans, ans], calls=3)
    assert results == [{"ok": True}] * 3 and accepts == 1
    assert reqs[0].startswith(b"POST /x HTTP/1.1\r\nhost: 127.0.0.1:")
    assert reqs[0].endswith(b'\r\n\r\n{"a": 1}')


def test_chunked_answers_are_reassembled() -> None:
    body = b"5\r\n{\"ok\"\r\n7;ext=1\r\n: true}\r\n0\r\nx-trailer: 1\r\n\r\n"
    results, _, _ = _run([_answer("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked", body)] * 2,
                         calls=2)
    assert results == [{"ok": True}] * 2


def test_an_answer_framed_by_close_and_a_continue_before_it() -> None:
    ans = b"HTTP/1.1 100 Continue\r\n\r\n" + _answer("HTTP/1.0 200 OK")
    results, _, _ = _run([ans], close_after=True)
    assert results == [{"ok": True}]


def test_a_closed_keep_alive_connection_is_retried_once_on_a_new_one() -> None:
    ans = _answer(f"HTTP/1.1 200 OK\r\ncontent-length: {len(JSON)}")
    results, _, accepts = _run([ans, ans], calls=2, close_after=True)
    assert results == [{"ok": True}] * 2 and accepts == 2


@pytest.mark.parametrize("bad", [
    b"SPDY/3 200 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
])
def test_garbage_is_a_call_error_not_a_hang(bad: bytes) -> None:
    results, _, _ = _run([bad], timeout=1.0)
    assert isinstance(results[0], CallError)
    assert "timed out" not in str(results[0])


def test_truncated_answer_is_a_connection_error() -> None:
    results, _, _ = _run([b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"], close_after=True)
    assert isinstance(results[0], CallError) and "ConnectionError" in str(results[0])


def test_5xx_and_4xx_keep_their_meaning() -> None:
    err: Callable[[int], bytes] = lambda s: _answer(  # noqa: E731
        f"HTTP/1.1 {s} X\r\ncontent-length: 15", b'{"detail": "x"}')
    results, _, _ = _run([err(500), err(404)], calls=2)
    assert isinstance(results[0], CallError) and results[0].retryable
    assert isinstance(results[1], CallError) and not results[1].retryable


def test_a_huge_announced_chunk_fails_at_once_not_at_the_timeout() -> None:
    # llhttp does not tell its caller a chunk's announced size: the answer is refused
    # when its bytes pass MAX_ANSWER, or (here) when the peer gives up, never at the timeout
    import time as _time

    start = _time.monotonic()
    results, _, _ = _run([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7fffffff\r\n"
                          + b"x" * 70000], timeout=2.0)
    assert isinstance(results[0], CallError) and "timed out" not in str(results[0])
    assert _time.monotonic() - start < 1.0  # not the timeout


def test_204_ends_at_the_blank_line_even_if_it_says_chunked() -> None:
    ans = b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n"
    results, _, _ = _run([ans], timeout=1.0)
    assert isinstance(results[0], CallError) and "timed out" not in str(results[0])


def test_each_event_loop_keeps_its_own_connections() -> None:
    import threading

    ans = _answer(f"HTTP/1.1 200 OK\r\ncontent-length: {len(JSON)}")

    async def serve() -> tuple[asyncio.AbstractServer, int]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(n)
                    writer.write(ans)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    server_loop = asyncio.new_event_loop()
    server, port = server_loop.run_until_complete(serve())
    threading.Thread(target=server_loop.run_forever, daemon=True).start()
    helper = AsyncHelper("t", f"http://127.0.0.1:{port}", CircuitBreaker("t", 50, 10, 2))
    errors: list[BaseException] = []

    def worker() -> None:
        async def calls() -> None:
            try:
                for _ in range(50):
                    assert await helper.post("/x", b"{}", 2.0) == {"ok": True}
            finally:
                helper.close_loop()

        try:
            asyncio.run(calls())
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    server_loop.call_soon_threadsafe(server.close)
    server_loop.call_soon_threadsafe(server_loop.stop)
    assert errors == []
    assert len(helper._idle) == 0  # every loop closed its own
