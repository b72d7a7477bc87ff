"""Small loopback stand-ins for a vLLM engine and the LMCache controller's HTTP API.

They answer in the real shapes (REFERENCE.md sections 2 and 3) and can be steered over
``/_stub/*`` (delays, failures, what each instance holds), which is what the integration
tests and the overhead benchmark need. The full engine simulator is ``kvgate.sim`` proper.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHUNK = 256


def tokenize_text(text: str) -> list[int]:
    """A deterministic word tokenizer: one id per whitespace-separated word."""
    return [zlib.crc32(w.encode("utf-8", "surrogatepass")) % 50_000 + 100 for w in text.split()]


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def tokenize_request(body: dict[str, Any]) -> list[int]:
    """Tokens for a /tokenize, completions or chat body, the way the engine prefills them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        return list(prompt[0])
    if isinstance(prompt, list):
        prompt = "\n".join(p for p in prompt if isinstance(p, str))
    if isinstance(prompt, str):
        return tokenize_text(prompt)
    messages = body.get("messages")
    tokens: list[int] = []
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                tokens.append(1 + zlib.crc32(str(m.get("role")).encode()) % 7)
                tokens.extend(tokenize_text(_content(m.get("content"))))
    return tokens


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # header and body go out in two writes
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self.server.app.handle(self, "GET", self.path, b"")

    def do_POST(self) -> None:  # noqa: N802
        self.server.app.handle(self, "POST", self.path, self._body())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr: tuple[str, int], app: StubApp) -> None:
        super().__init__(addr, _Handler)
        self.app = app

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client went away mid-answer: normal for streams and interrupts
        super().handle_error(request, client_address)


class StubApp:
    """Common plumbing: a record of calls, steerable faults, a server on a thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, Any]] = []
        self.delay = 0.0
        self.status = 0  # answer this status to everything when non-zero
        self.record = True
        self.httpd: _Server | None = None

    def handle(self, h: _Handler, method: str, path: str, body: bytes) -> None:
        if path.startswith("/_stub/"):
            self.control(h, method, path, body)
            return
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = None
        if self.record:
            with self.lock:
                self.calls.append((method, path, parsed if parsed is not None else body))
        if self.delay:
            time.sleep(self.delay)
        if self.status:
            h._send(self.status, {"detail": "stub failure"})
            return
        self.serve(h, method, path, parsed, body)

    def control(self, h: _Handler, method: str, path: str, body: bytes) -> None:
        if path == "/_stub/calls":
            with self.lock:
                h._send(200, [[m, p, b if not isinstance(b, bytes) else b.decode("latin-1")]
                              for m, p, b in self.calls])
            return
        if path == "/_stub/reset":
            with self.lock:
                self.calls.clear()
            h._send(200, {})
            return
        if path == "/_stub/config" and method == "POST":
            cfg = json.loads(body or b"{}")
            self.delay = float(cfg.get("delay", self.delay))
            self.status = int(cfg.get("status", self.status))
            self.record = bool(cfg.get("record", self.record))
            self.configure(cfg)
            h._send(200, {})
            return
        h._send(404, {"detail": "Not Found"})

    def configure(self, cfg: dict[str, Any]) -> None:
        pass

    def serve(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        h._send(404, {"detail": "Not Found"})

    def start(self, port: int = 0, host: str = "127.0.0.1") -> int:
        self.httpd = _Server((host, port), self)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self.httpd.server_address[1]

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


class StubEngine(StubApp):
    """Enough of vLLM's OpenAI server for routing tests: completions, chat, SSE, /tokenize."""

    def __init__(self, engine_id: str, stream_chunks: int = 3, stream_gap: float = 0.0) -> None:
        super().__init__()
        self.engine_id = engine_id
        self.stream_chunks = stream_chunks
        self.stream_gap = stream_gap
        self.garbage = False

    def configure(self, cfg: dict[str, Any]) -> None:
        self.stream_chunks = int(cfg.get("stream_chunks", self.stream_chunks))
        self.stream_gap = float(cfg.get("stream_gap", self.stream_gap))

    def serve(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        hdrs = {"x-engine-id": self.engine_id}
        if method == "GET" and path == "/health":
            h._send(200, b"", hdrs)
            return
        if method == "GET" and path.startswith("/v1/models"):
            h._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]},
                    hdrs)
            return
        if method == "GET":
            h._send(200, {"engine": self.engine_id, "path": path,
                          "host": h.headers.get("host")}, hdrs)
            return
        if not isinstance(body, dict):
            h._send(400, {"object": "error", "message": "body is not a JSON object"}, hdrs)
            return
        tokens = tokenize_request(body)
        if path == "/tokenize":
            h._send(200, {"count": len(tokens), "max_model_len": 32768, "tokens": tokens}, hdrs)
            return
        chat = path.endswith("/chat/completions")
        if body.get("stream"):
            self._stream(h, chat, len(tokens))
            return
        text = f"hello from {self.engine_id}"
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop"}
            if chat else {"index": 0, "text": text, "finish_reason": "stop"}
        )
        h._send(200, {
            "id": "cmpl-stub", "object": "chat.completion" if chat else "text_completion",
            "model": body.get("model", "stub-model"), "engine": self.engine_id,
            "host": h.headers.get("host"), "choices": [choice],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 4,
                      "total_tokens": len(tokens) + 4,
                      "prompt_tokens_details": {"cached_tokens": 0}},
        }, hdrs)

    def _stream(self, h: _Handler, chat: bool, n_prompt: int) -> None:
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("cache-control", "no-cache")
        h.send_header("x-engine-id", self.engine_id)
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()

        def chunk(data: bytes) -> None:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        for i in range(self.stream_chunks):
            delta = {"delta": {"content": f"tok{i} "}} if chat else {"text": f"tok{i} "}
            event = {"id": "cmpl-stub", "object": "chat.completion.chunk" if chat
                     else "text_completion", "choices": [{"index": 0, **delta,
                                                          "finish_reason": None}]}
            chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            if self.stream_gap:
                time.sleep(self.stream_gap)
        chunk(b"data: [DONE]\n\n")
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()


class StubController(StubApp):
    """The controller's HTTP API over a table of what each instance holds.

    ``/lookup`` walks chunks of 256 tokens like the real one and answers
    ``{id: [location, matched]}``; there is no ``/evict``; errors are 500 with detail.
    """

    def __init__(self, location: str = "LocalCPUBackend") -> None:
        super().__init__()
        self.location = location
        self.holdings: dict[str, list[list[int]]] = {}
        self.seed_form = False  # answer layout_info in the seed's object form
        self.workers: list[dict[str, Any]] = []  # the registry /query_worker_info reads

    def configure(self, cfg: dict[str, Any]) -> None:
        for instance_id, tokens in cfg.get("admit", []):
            self.holdings.setdefault(instance_id, []).append(list(tokens))
        if cfg.get("clear"):
            self.holdings.clear()
        self.seed_form = bool(cfg.get("seed_form", self.seed_form))

    def matched(self, query: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for instance_id, seqs in self.holdings.items():
            best = 0
            for held in seqs:
                n = 0
                limit = min(len(held), len(query))
                while n < limit and held[n] == query[n]:
                    n += 1
                if not n == len(held) == len(query):
                    n = (n // CHUNK) * CHUNK  # chunk hashes match only for equal chunks
                best = max(best, n)
            if best:
                out[instance_id] = best
        return out

    def serve(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        if method != "POST":
            h._send(405, {"detail": "Method Not Allowed"})
            return
        if not isinstance(body, dict):
            h._send(422, {"detail": "body is not a JSON object"})
            return
        event = {"event_id": f"evt-{time.monotonic_ns()}"}
        tokens = body.get("tokens") or []
        if path == "/lookup":
            m = self.matched(tokens)
            if self.seed_form:
                layout: dict[str, Any] = {k: {"0": self.location, "1": v} for k, v in m.items()}
            else:
                layout = {k: [self.location, v] for k, v in m.items()}
            h._send(200, {**event, "layout_info": layout})
        elif path in ("/pin", "/compress", "/decompress", "/move"):
            h._send(200, {**event, "num_tokens": len(tokens)})
        elif path == "/clear":
            h._send(200, {**event, "num_tokens": 0})
        elif path == "/health":
            h._send(200, {**event, "error_codes": {}})
        elif path == "/query_worker_info":
            iid = body.get("instance_id")
            infos = [w for w in self.workers if iid == "all" or w.get("instance_id") == iid]
            h._send(200, {**event, "worker_infos": infos})
        else:
            h._send(404, {"detail": "Not Found"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvgate-stub", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    eng = sub.add_parser("engine", help="a stub vLLM engine")
    eng.add_argument("--port", type=int, required=True)
    eng.add_argument("--id", default="vllm-1")
    ctl = sub.add_parser("controller", help="a stub LMCache controller HTTP API")
    ctl.add_argument("--port", type=int, required=True)
    ctl.add_argument("--delay", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args(argv)
    app: StubApp = StubEngine(args.id) if args.kind == "engine" else StubController()
    app.record = False
    if args.kind == "controller":
        app.delay = args.delay
    app.start(args.port)
    print(f"ready {args.kind} on 127.0.0.1:{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


if __name__ == "__main__":
    main()
