"""Keep-alive HTTP/1.1 POSTs on mitmproxy's event loop, for the request path.

The routing lookup is the one helper call a request waits for. Running it on a thread
cost about 1 ms per request here (hand-offs plus a blocking client competing with the
event loop for the GIL); on the loop it costs a socket write and a read.

Answers are framed by ``httptools`` (llhttp, the C parser uvicorn uses) on an
``asyncio.Protocol``. It replaced hand framing that trusted its peer too much (chunk
sizes such as ``0x7``, chunk data without CRLF, bare-LF heads); counted in instructions
it is no dearer (docs/hardening.md). On top of llhttp this client is strict about what
llhttp tolerates: a ``Transfer-Encoding`` other than exactly ``chunked`` is refused
(``gzip, chunked`` would leave gzip undecoded), and bytes that arrive when no call is
waiting (a peer speaking out of turn) close the connection, so they can never be taken as
the next call's answer. One request in flight per connection; 1xx answers skipped. One
call, one budget: no retries (the budget is shorter than any backoff) except one fresh
connection when a kept-alive one turns out closed, the same breaker and answer rules as
the threaded client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httptools

from .breaker import BreakerOpen, CircuitBreaker
from .http import CallError, decode_answer, guarded

MAX_ANSWER = 16 * 1024 * 1024
MAX_HEAD = 64 * 1024
T = TypeVar("T")


class ProtocolError(Exception):
    """The helper's answer is not HTTP/1.1 we can frame."""


class _StaleConnection(ConnectionError):
    """A reused connection was closed by the helper before it answered."""


class _Conn(asyncio.Protocol):
    """One HTTP/1.1 connection; ``waiter`` gets (status, body) when an answer is whole."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.keep_alive = True
        self.got_bytes = False
        self.parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.head_bytes = 0  # bytes seen before the head ended
        self.head_done = False
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.framed = False  # Content-Length or chunked: not ended by the close
        self.in_message = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # nobody asked: never let it answer the next call
            self._fail(ProtocolError("bytes from the helper while no call was waiting"))
            return
        self.got_bytes = True
        if not self.head_done:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD + MAX_ANSWER:
                self._fail(ProtocolError("answer too large"))
                return
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # llhttp's errors, ours raised from the callbacks
            self._fail(exc if isinstance(exc, ProtocolError) else ProtocolError(
                f"{type(exc).__name__}: {exc}"))
            return
        if not self.head_done and self.head_bytes > MAX_HEAD:
            self._fail(ProtocolError("answer head too large"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.framed and exc is None and self.waiter is not None:
            self._complete()  # framed by a clean end of the connection
            return
        if self.got_bytes:
            self._fail(ConnectionError("closed before the answer ended"))
        else:
            self._fail(_StaleConnection("closed before any answer"))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.waiter is None:  # a second answer to one request: out of turn
            raise ProtocolError("more answers than requests")
        self.in_message = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise ProtocolError("transfer-encoding other than chunked")
            self.framed = True
        elif len(name) == 14 and name.lower() == b"content-length":
            if not value.isdigit() or int(value) > MAX_ANSWER:
                raise ProtocolError("bad content-length")
            self.framed = True

    def on_headers_complete(self) -> None:
        self.head_done = True
        status = self.parser.get_status_code()
        if status < 200 or status in (204, 304):
            self.framed = True  # no body, whatever the headers say
        if not self.parser.should_keep_alive():
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_ANSWER:
            raise ProtocolError("answer too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:  # 100 Continue: not the answer
            self._reset()
            return
        self._complete()

    def _complete(self) -> None:
        status = self.parser.get_status_code()
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self._reset()
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result((status, body))

    def _fail(self, exc: BaseException) -> None:
        self.keep_alive = False
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def reusable(self) -> bool:
        return (self.keep_alive and not self.closed and self.waiter is None
                and not self.in_message)

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # its event loop has already ended
                self.transport.close()


class AsyncHelper:
    def __init__(self, name: str, base_url: str, breaker: CircuitBreaker,
                 max_idle: int = 64) -> None:
        parts = urlsplit(base_url)
        self.name = name
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None)
        self.prefix = parts.path.rstrip("/")
        self.breaker = breaker
        self.max_idle = max_idle
        self._head = (f"POST {{}} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
                      "content-type: application/json\r\ncontent-length: {}\r\n\r\n")
        # idle connections per event loop: a connection belongs to the loop that made it
        self._idle: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Conn]] = (
            weakref.WeakKeyDictionary())

    async def _connect(self, fresh: bool) -> tuple[_Conn, bool]:
        """An idle keep-alive connection (reused=True) or a new one."""
        loop = asyncio.get_running_loop()
        idle = self._idle.get(loop)
        while idle and not fresh:
            conn = idle.pop()
            if conn.reusable():
                return conn, True
            conn.close()
        _, conn = await loop.create_connection(_Conn, self.host, self.port, ssl=self.tls)
        return conn, False

    async def _exchange(self, path: str, body: bytes, fresh: bool) -> tuple[int, bytes, _Conn]:
        conn, reused = await self._connect(fresh)
        assert conn.transport is not None
        waiter = conn.waiter = asyncio.get_running_loop().create_future()
        conn.got_bytes = False
        try:
            conn.transport.write(self._head.format(self.prefix + path, len(body)).encode()
                                 + body)
            status, data = await waiter
        except _StaleConnection:
            conn.close()
            if reused:
                raise
            raise ConnectionError("closed before any answer") from None
        except BaseException:  # timeouts and cancels included: the answer is not ours
            conn.close()
            raise
        return status, data, conn

    def _release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(asyncio.get_running_loop(), [])
        if conn.reusable() and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    async def post(self, path: str, body: bytes, timeout: float,
                   read: Callable[[Any], T] | None = None) -> Any:
        """POST ``body``; the JSON answer, or ``read(answer)``. A ``read`` that raises
        ValueError or TypeError makes it a failed call, counted by the breaker: an answer
        routing cannot use is a failing helper, and nothing from it escapes."""
        if timeout <= 0:
            raise TimeoutError
        if not self.breaker.allow():
            raise BreakerOpen(f"{self.name} circuit breaker open")
        try:
            async with asyncio.timeout(timeout):
                try:
                    status, data, conn = await self._exchange(path, body, fresh=False)
                except _StaleConnection:
                    # the helper closed an idle keep-alive connection: one new one
                    status, data, conn = await self._exchange(path, body, fresh=True)
            self._release(conn)
            result = decode_answer(self.name, path, status, data)
            if read is not None:
                try:
                    result = read(result)
                except (ValueError, TypeError, ArithmeticError) as exc:
                    raise CallError(f"{self.name} {path}: unusable answer "
                                    f"({type(exc).__name__})", retryable=True) from None
        except TimeoutError:
            err = CallError(f"{self.name} {path}: timed out", retryable=True)
            guarded(self.breaker, err)
            raise err from None
        except (OSError, ProtocolError) as exc:
            err = CallError(f"{self.name} {path}: {type(exc).__name__}", retryable=True)
            guarded(self.breaker, err)
            raise err from None
        except CallError as exc:
            guarded(self.breaker, exc)
            raise
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        self.breaker.success()
        return result

    def close_loop(self) -> None:
        """Close the running loop's idle connections (before that loop ends)."""
        for conn in self._idle.pop(asyncio.get_running_loop(), []):
            conn.close()

    def close(self) -> None:
        pools = list(self._idle.values())
        self._idle.clear()
        for idle in pools:
            for conn in idle:
                conn.close()
