"""Keep-alive HTTP/1.1 POSTs on mitmproxy's event loop, for the request path.

The routing lookup is the one helper call a request waits for. Running it on a thread
cost about 1 ms per request here (hand-offs plus a blocking client competing with the
event loop for the GIL); on the loop it costs a socket write and a read. Framing is h11,
which mitmproxy already ships. One call, one budget: no retries (the budget is shorter
than any backoff), the same breaker and answer rules as the threaded client.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit

import h11

from .breaker import BreakerOpen, CircuitBreaker
from .client import CallError, decode_answer, guarded

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter, h11.Connection]


class _StaleConnection(ConnectionError):
    """A reused connection was closed by the helper before it answered."""


class AsyncHelper:
    def __init__(self, name: str, base_url: str, breaker: CircuitBreaker,
                 max_idle: int = 64) -> None:
        parts = urlsplit(base_url)
        self.name = name
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc
        self.breaker = breaker
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connect(self, fresh: bool) -> tuple[_Conn, bool]:
        """An idle keep-alive connection (reused=True) or a new one."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections belong to one loop
            self.close()
            self._loop = loop
        while self._idle and not fresh:
            reader, writer, conn = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return (reader, writer, conn), True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls or None)
        return (reader, writer, h11.Connection(h11.CLIENT)), False

    async def _exchange_once(self, path: str, body: bytes) -> tuple[int, bytes, _Conn]:
        try:
            return await self._exchange(path, body, fresh=False)
        except _StaleConnection:
            # The helper closed an idle keep-alive connection: one retry on a new one.
            return await self._exchange(path, body, fresh=True)

    async def _exchange(self, path: str, body: bytes, fresh: bool) -> tuple[int, bytes, _Conn]:
        c, reused = await self._connect(fresh)
        reader, writer, conn = c
        status = 0
        try:
            headers = [
                ("host", self.host_header),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ]
            writer.write(
                conn.send(h11.Request(method="POST", target=self.prefix + path, headers=headers))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data and reused and not status:
                        raise _StaleConnection
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return status, b"".join(chunks), c
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("closed before the answer ended")
        except _StaleConnection:
            writer.close()
            raise
        except OSError as exc:  # includes ConnectionError: reset, broken pipe
            writer.close()
            if reused and not status:
                raise _StaleConnection from exc
            raise
        except BaseException:
            writer.close()
            raise

    def _release(self, c: _Conn) -> None:
        reader, writer, conn = c
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE and len(
            self._idle
        ) < self.max_idle:
            conn.start_next_cycle()
            self._idle.append(c)
        else:
            writer.close()

    async def post(self, path: str, body: bytes, timeout: float) -> Any:
        if timeout <= 0:
            raise TimeoutError
        if not self.breaker.allow():
            raise BreakerOpen(f"{self.name} circuit breaker open")
        try:
            async with asyncio.timeout(timeout):
                status, data, c = await self._exchange_once(path, body)
            self._release(c)
            result = decode_answer(self.name, path, status, data)
        except TimeoutError:
            err = CallError(f"{self.name} {path}: timed out", retryable=True)
            guarded(self.breaker, err)
            raise err from None
        except (OSError, h11.ProtocolError) as exc:
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

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer, _ in idle:
            with contextlib.suppress(RuntimeError):  # its event loop has already ended
                writer.close()
