"""Keep-alive HTTP/1.1 POSTs on mitmproxy's event loop, for the request path.

The routing lookup is the one helper call a request waits for. Running it on a thread
cost about 1 ms per request here (hand-offs plus a blocking client competing with the
event loop for the GIL); on the loop it costs a socket write and a read. Framing is h11,
which mitmproxy already ships. One call, one budget: no retries (the budget is shorter
than any backoff), the same breaker and answer rules as the threaded client.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import h11

from .breaker import BreakerOpen, CircuitBreaker
from .client import CallError, decode_answer, guarded

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter, h11.Connection]


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

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections belong to one loop
            self._idle.clear()
            self._loop = loop
        while self._idle:
            reader, writer, conn = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, conn
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls or None)
        return reader, writer, h11.Connection(h11.CLIENT)

    async def _exchange(self, path: str, body: bytes) -> tuple[int, bytes, _Conn]:
        reader, writer, conn = c = await self._connect()
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
            status = 0
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return status, b"".join(chunks), c
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("closed before the answer ended")
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
                status, data, c = await self._exchange(path, body)
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
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()
