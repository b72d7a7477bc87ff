"""A fast loopback backend for the overhead benchmark: fixed answers, keep-alive, asyncio.

The benchmark measures the addon's cost, so the backends around it must be cheap on this
2-core machine (the threaded stubs spend ~0.3 ms of CPU per answer, which the proxy then
loses). ``engine`` answers every request with a small completion; ``controller`` answers
``/lookup`` with one instance holding a fixed prefix, after an optional delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from abc import ABC, abstractmethod


def response(payload: object, status: str = "200 OK") -> bytes:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
    return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body


class Framed(asyncio.Protocol, ABC):
    """Keep-alive HTTP/1.1 requests with Content-Length bodies, framed by hand: a stand-in
    must cost the machine it shares with the proxy as little as it can. Subclasses answer
    each request in ``handle``."""

    def __init__(self) -> None:
        self.buf = bytearray()  # grown in place: bodies of megabytes arrive in pieces
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            head, body = bytes(self.buf[:end]), bytes(self.buf[end + 4:total])
            del self.buf[:total]
            self.handle(head, body)

    @abstractmethod
    def handle(self, head: bytes, body: bytes) -> None: ...

    def reply(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)


class _Proto(Framed):
    def __init__(self, answer: bytes, delay: float, tokenize: bytes = b"") -> None:
        super().__init__()
        self.answer = answer
        self.tokenize = tokenize
        self.delay = delay

    def handle(self, head: bytes, body: bytes) -> None:
        is_tokenize = self.tokenize and head.startswith(b"POST /tokenize ")
        answer = self.tokenize if is_tokenize else self.answer
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.reply, answer)
        else:
            self.reply(answer)


async def serve(kind: str, port: int, delay: float, engine_id: str) -> None:
    tokenize = b""
    if kind == "engine":
        tokens = list(range(100, 356))
        tokenize = response({"count": len(tokens), "max_model_len": 4096, "tokens": tokens})
        answer = response({
            "id": "cmpl-fast", "object": "text_completion", "engine": engine_id,
            "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })
    else:
        layout = {engine_id: ["LocalCPUBackend", 256]}
        answer = response({"event_id": "evt", "layout_info": layout})
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Proto(answer, delay, tokenize), "127.0.0.1", port)
    print(f"ready fast {kind} on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kind", choices=["engine", "controller"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--id", default="engine-1", help="engine id (controller: who holds it)")
    args = ap.parse_args()
    asyncio.run(serve(args.kind, args.port, args.delay, args.id))


if __name__ == "__main__":
    main()
