"""Issue 11, defects 1 and 4: helpers that answer garbage, frame badly or speak out of turn.

Raw asyncio servers stand in for the LMCache controller, so every byte is the test's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kvgate.clients.aio_http import AsyncHelper
from kvgate.clients.breaker import CircuitBreaker
from kvgate.clients.http import CallError
from kvgate.clients.lmcache import lookup_async
from kvgate.placement.layout import MAX_PLACEMENTS, Placement, parse_layout

JSON = b'{"ok": true}'


def _ok(body: bytes = JSON) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body


async def _server(script: Any) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return await reader.readexactly(n)


def _helper(port: int, threshold: int = 5) -> AsyncHelper:
    return AsyncHelper("lmcache", f"http://127.0.0.1:{port}",
                       CircuitBreaker("lmcache", threshold, 10, 1))


# ------------------------------------------------------------ defect 4: out of turn


def test_a_connection_that_speaks_out_of_turn_is_dropped_at_once() -> None:
    """Bytes on an idle kept-alive connection: the old client parsed and dropped them
    and kept using the connection, so a peer out of step stayed in use; now the
    connection is closed the moment it speaks unasked, and later calls are answered on a
    new one."""

    async def main() -> list[Any]:
        accepts = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepts
            accepts += 1
            n = 0
            try:
                while True:
                    await _read_request(reader)
                    n += 1
                    writer.write(_ok(b'{"call": %d}' % n))
                    await writer.drain()
                    if accepts == 1 and n == 1:  # then, unasked, an answer of its own
                        await asyncio.sleep(0.03)
                        writer.write(_ok(b'{"call": "stray"}'))
                        await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server, port = await _server(handle)
        helper = _helper(port)
        out = [await helper.post("/lookup", b"{}", 2.0)]
        await asyncio.sleep(0.1)  # the stray bytes arrive while nothing waits
        out.append(await helper.post("/lookup", b"{}", 2.0))
        out.append(await helper.post("/lookup", b"{}", 2.0))
        out.append(accepts)
        helper.close()
        server.close()
        return out

    first, second, third, accepts = asyncio.run(main())
    assert first == {"call": 1}
    assert accepts == 2  # dropped: a new connection answers for itself
    assert second == {"call": 1} and third == {"call": 2}


def test_two_answers_in_one_packet_drop_the_connection() -> None:
    async def main() -> tuple[Any, Any, int]:
        accepts = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepts
            accepts += 1
            try:
                while True:
                    await _read_request(reader)
                    writer.write(_ok(b'{"n": 1}') + _ok(b'{"n": "extra"}'))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server, port = await _server(handle)
        helper = _helper(port)
        a = await helper.post("/lookup", b"{}", 2.0)
        b = await helper.post("/lookup", b"{}", 2.0)
        helper.close()
        server.close()
        return a, b, accepts

    a, b, accepts = asyncio.run(main())
    assert a == {"n": 1} and b == {"n": 1} and accepts == 2


# ------------------------------------------------------------ defect 4: strict framing


BAD = {
    "chunk data without CRLF": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                               b"c\r\n{\"ok\": true}XX0\r\n\r\n",
    "chunk size 0x7": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                      b"0xc\r\n{\"ok\": true}\r\n0\r\n\r\n",
    "chunk size 0_7": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                      b"0_c\r\n{\"ok\": true}\r\n0\r\n\r\n",
    "xchunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: xchunked\r\n\r\n"
                b"c\r\n{\"ok\": true}\r\n0\r\n\r\n",
    "gzip, chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
                     b"c\r\n{\"ok\": true}\r\n0\r\n\r\n",
    "conflicting content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n"
                                  b"content-length: 13\r\n\r\n{\"ok\": true}",
    "bare LF head": b"HTTP/1.1 200 OK\ncontent-length: 12\n\n{\"ok\": true}",
    "content-length with chunked": b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n"
                                   b"transfer-encoding: chunked\r\n\r\nc\r\n{\"ok\": true}"
                                   b"\r\n0\r\n\r\n",
    "content-length +12": b"HTTP/1.1 200 OK\r\ncontent-length: +12\r\n\r\n{\"ok\": true}",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_framing_fails_at_once(name: str) -> None:
    """Each of these was accepted, or waited out the whole budget, before."""

    async def main() -> tuple[Any, float]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await _read_request(reader)
                writer.write(BAD[name])
                await writer.drain()
                await reader.read()  # keep the connection open: no close to frame by
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()

        server, port = await _server(handle)
        helper = _helper(port)
        t0 = time.monotonic()
        try:
            result: Any = await helper.post("/lookup", b"{}", 3.0)
        except CallError as exc:
            result = exc
        elapsed = time.monotonic() - t0
        helper.close()
        server.close()
        return result, elapsed

    result, elapsed = asyncio.run(main())
    assert isinstance(result, CallError), result
    assert "ProtocolError" in str(result)
    assert elapsed < 1.0  # at once, not at the 3 s budget


def test_a_strict_client_still_reads_what_real_servers_send() -> None:
    """Chunk extensions, trailers, close-delimited HTTP/1.0 and 100 Continue stay fine."""

    async def main() -> list[Any]:
        answers = [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5;ext=1\r\n{\"ok\"\r\n7\r\n: true}\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(),
            b"HTTP/1.0 200 OK\r\n\r\n" + JSON,
        ]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while answers:
                    await _read_request(reader)
                    last = len(answers) == 1
                    writer.write(answers.pop(0))
                    await writer.drain()
                    if last:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()

        server, port = await _server(handle)
        helper = _helper(port)
        out = [await helper.post("/x", b"{}", 2.0) for _ in range(3)]
        helper.close()
        server.close()
        return out

    assert asyncio.run(main()) == [{"ok": True}] * 3


# ------------------------------------------------------------ defect 1: hostile numbers


@pytest.mark.parametrize("count", [
    "NaN", "Infinity", "-Infinity", "1e400", "true", "-5", "1.5", '"12"', "null",
    "123456789012345678901234567890", "[1]", "{}",
])
def test_a_bad_count_in_a_raw_answer_never_escapes_the_lookup(count: str) -> None:
    """The old parse_layout raised ValueError/OverflowError on NaN, Infinity and 1e400."""

    async def main() -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await _read_request(reader)
                    body = b'{"event_id": "e", "layout_info": {"vllm-1": ["L", %s], ' \
                           b'"vllm-2": ["L", 256]}}' % count.encode()
                    writer.write(_ok(body))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server, port = await _server(handle)
        helper = _helper(port)
        try:
            result: Any = await lookup_async(helper, [1, 2, 3], 2.0)
        except CallError as exc:
            result = exc
        helper.close()
        server.close()
        return result

    result = asyncio.run(main())
    # a count that is not JSON (NaN, Infinity, 1e400) fails the lookup; a wrong-typed one
    # is skipped and the good entry stays
    assert isinstance(result, CallError) or result == [Placement("vllm-2", "L", 256)]


@pytest.mark.parametrize("count", [float("nan"), float("inf"), -float("inf"), 10**400,
                                   True, False, -1, 1.5, 2**31, "7", None, [1], {"a": 1}])
def test_parse_layout_skips_each_bad_count(count: object) -> None:
    answer = {"layout_info": {"bad": ["L", count], "good": ["L", 4],
                              "bad2": {"0": "L", "1": count}}}
    assert parse_layout(answer) == [Placement("good", "L", 4)]


@pytest.mark.parametrize("entry", [[5, 4], [["L"], 4], [{"x": 1}, 4], ["L" * 10_000, 4]])
def test_parse_layout_skips_bad_locations(entry: object) -> None:
    assert parse_layout({"layout_info": {"bad": entry, "good": ["L", 4]}}) == [
        Placement("good", "L", 4)]


def test_a_huge_layout_keeps_only_the_longest_holders() -> None:
    layout = {f"i{n}": ["L", n] for n in range(100_000)}
    got = parse_layout({"layout_info": layout})
    assert len(got) == MAX_PLACEMENTS
    assert min(p.tokens for p in got) == 100_000 - MAX_PLACEMENTS


def test_answers_without_a_layout_open_the_breaker() -> None:
    """A controller answering 200 with garbage is a failing controller: its lookups fail
    (the request falls back) and, counted, they open the breaker."""

    async def main() -> tuple[list[str], str]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await _read_request(reader)
                    writer.write(_ok(b'{"detail": "not a layout"}'))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server, port = await _server(handle)
        helper = _helper(port, threshold=3)
        seen = []
        for _ in range(4):
            try:
                await lookup_async(helper, [1], 2.0)
                seen.append("ok")
            except Exception as exc:  # CallError, then BreakerOpen
                seen.append(type(exc).__name__)
        helper.close()
        server.close()
        return seen, helper.breaker.state.value

    seen, state = asyncio.run(main())
    assert seen == ["CallError", "CallError", "CallError", "BreakerOpen"]
    assert state == "open"


# ------------------------------------------------------------ defect 1: the whole step


@pytest.mark.parametrize("count", [float("nan"), float("inf"), 1e308 * 10, 10**30, True])
def test_hostile_counts_fall_back_and_open_the_breaker(make_gateway, controller,
                                                       count: object) -> None:
    """Before: ValueError/OverflowError escaped route_async on every request (traceback,
    unrouted, uncounted) and the breaker never opened."""
    import json as _json

    from kvgate.policies import base as routing

    controller.layout = {"vllm-1": count, "vllm-2": 300}  # type: ignore[dict-item]
    gw = make_gateway({"circuit_breaker": {"failure_threshold": 3}})
    body = _json.dumps({"model": "m", "prompt": [5, 6, 7]}).encode()
    decisions = [gw.route("vllm", body).decision for _ in range(5)]
    assert all(d is not None for d in decisions)
    if isinstance(count, float):  # NaN/Infinity are not JSON: failed lookups
        assert {d.reason for d in decisions} == {routing.FALLBACK}
        assert gw.helpers.lmcache_breaker.state.value == "open"
        assert gw.counters.get("lookup.routing_failed") == 5
    else:  # a wrong-typed or huge count is skipped: the good entry routes
        assert {(d.reason, d.endpoint.id) for d in decisions} == {(routing.CACHE, "vllm-2")}
