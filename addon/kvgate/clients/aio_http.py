"""Keep-alive HTTP/1.1 POSTs on mitmproxy's event loop, for the request path.

The routing lookup is the one helper call a request waits for. Running it on a thread
cost about 1 ms per request here (hand-offs plus a blocking client competing with the
event loop for the GIL); on the loop it costs a socket write and a read.

Framing is done here, on an ``asyncio.Protocol``, rather than with h11 over streams: a
profile of the overhead benchmark put h11 and the stream machinery at ~160 us of the
addon's ~500 us per request, and this at ~60. It is deliberately small: one request in
flight per connection, answers framed by Content-Length, chunked encoding, or the end of
the connection; 1xx answers skipped; anything else is a protocol error. One call, one
budget: no retries (the budget is shorter than any backoff) except one fresh connection
when a kept-alive one turns out closed, the same breaker and answer rules as the threaded
client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from typing import Any
from urllib.parse import urlsplit

from .breaker import BreakerOpen, CircuitBreaker
from .http import CallError, decode_answer, guarded

MAX_ANSWER = 16 * 1024 * 1024
MAX_HEAD = 64 * 1024


class ProtocolError(Exception):
    """The helper's answer is not HTTP/1.1 we can frame."""


class _StaleConnection(ConnectionError):
    """A reused connection was closed by the helper before it answered."""


class _Conn(asyncio.Protocol):
    """One HTTP/1.1 connection; ``waiter`` gets (status, body) when an answer is whole."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.buf = bytearray()
        self.closed = False
        self.keep_alive = True
        self.got_bytes = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.length: int | None = None  # Content-Length; None: chunked or until close
        self.chunked = False
        self.head_done = False
        self.body = bytearray()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.buf += data
        try:
            self._parse()
        except ProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and self.length is None and not self.chunked and exc is None:
            self._done()  # framed by a clean end of the connection
            return
        if self.got_bytes:
            self._fail(ConnectionError("closed before the answer ended"))
        else:
            self._fail(_StaleConnection("closed before any answer"))

    # -- framing
    def _parse(self) -> None:
        while True:
            if not self.head_done:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise ProtocolError("answer head too large")
                    return
                self._read_head(bytes(self.buf[:end]))
                del self.buf[:end + 4]
                if 100 <= self.status < 200:  # 100 Continue and friends: not the answer
                    self._reset()
                    continue
            if self.chunked:
                if not self._read_chunks():
                    return
            elif self.length is not None:
                if len(self.buf) < self.length:
                    return
                self.body += self.buf[:self.length]
                del self.buf[:self.length]
            else:  # until the connection closes
                self.body += self.buf
                self.buf.clear()
                if len(self.body) > MAX_ANSWER:
                    raise ProtocolError("answer too large")
                return
            self._done()
            return

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError("not an HTTP/1.x answer")
        self.status = int(parts[1])
        http10 = parts[0] == b"HTTP/1.0"
        conn_hdr = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError("bad header line")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit() or int(value) > MAX_ANSWER:
                    raise ProtocolError("bad content-length")
                self.length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                conn_hdr = value.lower()
        if self.chunked:
            self.length = None
        if b"close" in conn_hdr or (http10 and b"keep-alive" not in conn_hdr):
            self.keep_alive = False
        if 100 <= self.status < 200 or self.status in (204, 304):
            self.length = 0  # no body, whatever the headers say
            self.chunked = False
        elif self.length is None and not self.chunked:
            self.keep_alive = False  # framed by the end of the connection
        self.head_done = True

    def _read_chunks(self) -> bool:
        """True when the last chunk (and the trailer) arrived."""
        while True:
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                if len(self.buf) > MAX_HEAD:
                    raise ProtocolError("chunk size line too long")
                return False
            size_text = bytes(self.buf[:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            if size < 0 or len(self.body) + size > MAX_ANSWER:
                raise ProtocolError("answer too large")
            if size == 0:
                if self.buf.startswith(b"\r\n", eol + 2):  # no trailer
                    del self.buf[:eol + 4]
                    return True
                end = self.buf.find(b"\r\n\r\n", eol)
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise ProtocolError("trailer too large")
                    return False
                del self.buf[:end + 4]
                return True
            if len(self.buf) < eol + 2 + size + 2:
                return False
            self.body += self.buf[eol + 2:eol + 2 + size]
            del self.buf[:eol + 2 + size + 2]
            if len(self.body) > MAX_ANSWER:
                raise ProtocolError("answer too large")

    def _done(self) -> None:
        w, self.waiter = self.waiter, None
        status, body = self.status, bytes(self.body)
        self._reset()
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
                and not self.buf and not self.head_done)

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

    async def post(self, path: str, body: bytes, timeout: float) -> Any:
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
