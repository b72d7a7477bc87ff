"""The benchmark's client: streamed OpenAI requests over kept-alive connections, timed
from the client's side, played open-loop (as vLLM's ``benchmark_serving --request-rate``)
or closed-loop (to measure the cluster's capacity).

Time to first token is the wall time from sending the request to the first SSE event,
so it includes whatever the router in between costs. The engine's own view (its model
TTFT, which engine served it, the cached tokens) comes in the stream's usage event.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11

from .workloads import Step, Workload

MODEL = "sim-8b"


@dataclass
class Record:
    session: int
    step: int
    start: float  # seconds since the run began
    ok: bool = False
    error: str = ""
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    engine_ttft_ms: float = 0.0
    engine: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    body: dict[str, Any] | None = field(default=None, repr=False)  # as sent (for the floor)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Kept-alive HTTP/1.1 connections to one base URL, opened as concurrency needs them."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[_Conn] = []

    async def _conn(self) -> _Conn:
        if self.idle:
            return self.idle.pop()
        return _Conn(*await asyncio.open_connection(self.host, self.port))

    async def stream(self, path: str, body: dict, rec: Record, t0: float) -> str:
        """POST ``body`` and read the SSE answer into ``rec``; returns the assistant text."""
        data = json.dumps(body).encode()
        conn = await self._conn()
        sent = time.perf_counter()
        text: list[str] = []
        buf = b""
        try:
            conn.writer.write(conn.h11.send(h11.Request(
                method="POST", target=path,
                headers=[("host", f"{self.host}:{self.port}"),
                         ("content-type", "application/json"),
                         ("content-length", str(len(data)))])))
            conn.writer.write(conn.h11.send(h11.Data(data=data)))
            conn.writer.write(conn.h11.send(h11.EndOfMessage()))
            status = 0
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    chunk = await conn.reader.read(65536)
                    conn.h11.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    if not rec.ttft_ms and status == 200:
                        rec.ttft_ms = (time.perf_counter() - sent) * 1000
                    buf += bytes(event.data)
                    *frames, buf = buf.split(b"\n\n")
                    for frame in frames:
                        _read_frame(frame, rec, text)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("closed mid-answer")
            rec.e2e_ms = (time.perf_counter() - sent) * 1000
            if status != 200:
                rec.error = f"status {status}"
            else:
                rec.ok = True
            conn.h11.start_next_cycle()
            self.idle.append(conn)
        except (OSError, h11.ProtocolError, ConnectionError, ValueError) as exc:
            rec.error = type(exc).__name__
            conn.close()
        return "".join(text)

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


def _read_frame(frame: bytes, rec: Record, text: list[str]) -> None:
    line = frame.strip()
    if not line.startswith(b"data:"):
        return
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return
    msg = json.loads(payload)
    for choice in msg.get("choices") or ():
        delta = choice.get("delta") or {}
        piece = delta.get("content") if "delta" in choice else choice.get("text")
        if piece:
            text.append(piece)
    usage = msg.get("usage")
    if usage:
        rec.prompt_tokens = usage.get("prompt_tokens", 0)
        rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    sim = msg.get("sim")
    if sim:
        rec.engine = sim.get("engine", "")
        rec.engine_ttft_ms = sim.get("ttft_ms", 0.0)


async def run_session(pool: Pool | Callable[[], Pool], steps: list[Step], session: int,
                      t0: float, out: list[Record], max_tokens: int,
                      model: str = MODEL) -> None:
    """A session's steps in order; ``pool`` may be a function picking one per request."""
    state: dict = {}
    for i, step in enumerate(steps):
        body = step(state)
        chat = "messages" in body
        body.update({"model": model, "max_tokens": max_tokens, "stream": True,
                     "stream_options": {"include_usage": True}})
        rec = Record(session, i, time.perf_counter() - t0, body=body)
        out.append(rec)
        target = pool if isinstance(pool, Pool) else pool()
        answer = await target.stream(f"/v1/{'chat/' if chat else ''}completions", body, rec,
                                     t0)
        if not rec.ok:
            return  # a broken conversation stops, as a user's would
        if "messages" in state:  # a conversation: the answer joins its history
            state["messages"].append({"role": "assistant", "content": answer})


def gaps(rate: float, arrival: str, rng: random.Random) -> Iterator[float]:
    """Inter-arrival times: Poisson, or bursty (gamma, shape 0.25: the same mean rate,
    arrivals in clumps; as ``benchmark_serving --burstiness 0.25``)."""
    while True:
        if arrival == "poisson":
            yield rng.expovariate(rate)
        else:
            yield rng.gammavariate(0.25, 1 / (0.25 * rate))


async def open_loop(base_url: str, wl: Workload, rate: float, seconds: float,
                    arrival: str, rng: random.Random, max_tokens: int,
                    fault: Callable[[float], Awaitable[None]] | None = None,
                    drain: float = 60.0, model: str = MODEL, warmup: float = 0.0
                    ) -> tuple[list[Record], float]:
    """Start sessions at ``rate`` requests/s (sessions at rate / steps per session) for
    ``warmup`` + ``seconds``; wait for them to finish (at most ``drain`` more).
    (records, window): the requests sent after the warm-up, their ``start`` counted from
    its end. The warm-up is played the same way but not measured, so what is measured is
    the cluster and the router past their first second (caches filled, slots learnt), as a
    gateway that has been up a while serves; a fault is scheduled after it too."""
    pool = Pool(base_url)
    out: list[Record] = []
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    session_rate = rate / wl.steps_per_session
    sessions = iter(wl.sessions)
    fault_task = asyncio.ensure_future(_after(warmup, fault(seconds))) if fault else None
    at = 0.0
    for gap in gaps(session_rate, arrival, rng):
        at += gap
        if at >= warmup + seconds:
            break
        steps = next(sessions, None)
        if steps is None:
            break
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        tasks.append(asyncio.ensure_future(
            run_session(pool, steps, len(tasks), t0, out, max_tokens, model)))
    window = time.perf_counter() - t0 - warmup
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=drain)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for rec in out:
        if not rec.ok and not rec.error:
            rec.error = "unfinished"
    if fault_task is not None:
        await fault_task
    pool.close()
    measured = [rec for rec in out if rec.start >= warmup]
    for rec in measured:
        rec.start -= warmup
    return measured, max(window, seconds)


async def _after(delay: float, then: Awaitable[None]) -> None:
    await asyncio.sleep(delay)
    await then


async def closed_loop(urls: list[str], wl: Workload, workers: int, seconds: float,
                      max_tokens: int, warmup: float = 1.0, model: str = MODEL) -> float:
    """Requests completed per second with ``workers`` sessions always in flight, each
    request sent to the next engine in turn by the client (no router, no affinity): the
    cluster's capacity for this stream when nobody routes by cache."""
    pools = [Pool(u) for u in urls]
    out: list[Record] = []
    sessions = iter(wl.sessions)
    t0 = time.perf_counter()
    stop_at = t0 + warmup + seconds
    turn = 0

    def next_pool() -> Pool:
        nonlocal turn
        turn += 1
        return pools[turn % len(pools)]

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            steps = next(sessions, None)
            if steps is None:
                return
            await run_session(next_pool, steps, 0, t0, out, max_tokens, model)

    await asyncio.wait([asyncio.ensure_future(worker()) for _ in range(workers)],
                       timeout=warmup + seconds + 30)
    for p in pools:
        p.close()
    done = [r for r in out if r.ok and warmup <= r.start + r.e2e_ms / 1000 <= warmup + seconds]
    return len(done) / seconds
