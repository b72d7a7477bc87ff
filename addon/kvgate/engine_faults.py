"""The mitmproxy glue for engine faults: what an engine's answers say about its health,
and what to do when it does not answer. The routing addon (``addon``) calls it from its
own hooks, so mitmproxy dispatches each event to one kvgate addon, not two.

- A failed answer (5xx, a reset, a kill mid-answer, no headers in time) counts against
  the engine; enough in a row eject it, with a back-off (``fleet.outliers``).
- No response headers within ``response_headers_timeout``: the client gets a clear 504 from
  the gateway (mitmproxy has no upstream read timeout of its own).
- An engine that refuses the connection never got the request: it goes to another
  healthy engine instead of failing with 502 (mitmproxy cannot retry its own connect).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from mitmproxy import ctx, http
from mitmproxy.proxy import events, server_hooks

from .gateway import Gateway

META = "kvcache"  # the flow.metadata key the routing addon writes

log = logging.getLogger("kvgate")

_CONNECT_FAILURES = (
    "connect call failed",  # asyncio: [Errno 111] Connect call failed ('127.0.0.1', 9)
    "cannot connect",
    "connection refused",
    "unreachable",
    "name or service not known",
    "nodename nor servname",
)


CONNECT_PROBE_TIMEOUT = 1.0


def _is_server_failure(flow: http.HTTPFlow) -> bool:
    """The engine's side ended the exchange (reset, killed, garbage) after the request
    went out; not the client going away, not a kill by an addon."""
    msg = (flow.error.msg if flow.error is not None else "").lower()
    if not msg or "client" in msg or msg == "connection killed.":
        return False
    return bool(flow.server_conn.timestamp_start)


def _is_connect_failure(msg: str) -> bool:
    """mitmproxy's words for an upstream that could not be reached (not kills, not resets)."""
    msg = msg.lower()
    return any(mark in msg for mark in _CONNECT_FAILURES)



class EngineFaults:
    def __init__(self) -> None:
        # routed flows, by id, with the gateway that routed them
        self._flows: dict[str, Gateway] = {}
        # flows sent to an engine and waiting for its response headers, oldest first:
        # flow id -> (deadline, flow, gateway); swept by _watch
        self._waiting: dict[str, tuple[float, http.HTTPFlow, Gateway]] = {}
        self._watcher: asyncio.Task[None] | None = None
        # client connection id -> the routed flow whose upstream it is about to open
        self._connecting: dict[str, http.HTTPFlow] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    # ------------------------------------------------------------ called from the hooks

    def routed(self, flow: http.HTTPFlow, gw: Gateway) -> None:
        """The routing addon sent ``flow`` to an engine: watch it."""
        self._flows[flow.id] = gw
        self._connecting[flow.client_conn.id] = flow
        if gw.kv.response_headers_timeout > 0:
            self._waiting[flow.id] = (time.monotonic() + gw.kv.response_headers_timeout,
                                      flow, gw)
            if self._watcher is None:
                self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def headers_in(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)
        self._connecting.pop(flow.client_conn.id, None)

    def answered(self, flow: http.HTTPFlow) -> None:
        try:
            gw = self._flows.pop(flow.id, None)
            meta = flow.metadata.get(META)
            resp = flow.response
            if meta and gw is not None and resp is not None and not meta.get("timed_out"):
                status = resp.data.status_code  # (the property is a call)
                if status >= 500:
                    self._suspect(gw, meta["endpoint"], f"status {status}")
                else:
                    gw.fleet.outliers.success(meta["endpoint"])
        except Exception:
            log.exception("[kvcache] response hook error")

    def failed(self, flow: http.HTTPFlow) -> None:
        try:
            self._waiting.pop(flow.id, None)
            self._connecting.pop(flow.client_conn.id, None)
            gw = self._flows.pop(flow.id, None)
            meta = flow.metadata.get(META)
            if meta and gw is not None and flow.error is not None and not meta.get(
                    "timed_out"):
                msg = flow.error.msg
                if _is_connect_failure(msg):
                    self._eject_now(gw, meta["endpoint"], msg)
                elif _is_server_failure(flow):  # a reset or a kill mid-answer
                    self._suspect(gw, meta["endpoint"], msg)
        except Exception:
            log.exception("[kvcache] error hook error")

    def _suspect(self, gw: Gateway, endpoint_id: str, why: str) -> None:
        """One failed answer; the one that ejects the engine is logged, once."""
        span = gw.fleet.outliers.failure(endpoint_id)
        if span is not None:
            gw.counters.inc("health.ejections")
            log.warning("[kvcache] endpoint %s ejected for %.0fs: %d failed answers in a row"
                        " (last: %s)", endpoint_id, span,
                        gw.fleet.outliers.failures_needed, why[:120])

    def _eject_now(self, gw: Gateway, endpoint_id: str, why: str) -> None:
        span = gw.fleet.outliers.connect_failed(endpoint_id)
        if span is not None:  # None: already out, this is not a new event
            gw.counters.inc("health.ejections")
            log.warning("[kvcache] endpoint %s ejected for %.0fs: %s", endpoint_id, span,
                        why[:120])

    async def _watch(self) -> None:
        """Every flow waiting past response_headers_timeout gets a 504 from the gateway
        (mitmproxy has no upstream read timeout) and its engine a failure."""
        try:
            while self._waiting:
                gw = next(iter(self._waiting.values()))[2]
                await asyncio.sleep(min(1.0, gw.kv.response_headers_timeout / 4))
                now = time.monotonic()
                late = [fid for fid, (deadline, _, _) in self._waiting.items() if deadline <= now]
                for fid in late:
                    _, flow, owner = self._waiting.pop(fid)
                    self._time_out(owner, flow)
        finally:
            self._watcher = None

    def _time_out(self, gw: Gateway, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if not meta or flow.response is not None or flow.error is not None:
            return
        meta["timed_out"] = True
        self._suspect(gw, meta["endpoint"],
                      f"no response headers in {gw.kv.response_headers_timeout:g}s")
        gw.counters.inc("engine.timeouts")
        # mitmproxy offers no way to end a flow that waits on its server with an answer of
        # our own; its server connection does: the 504 is fed to it as if the engine had
        # sent it (then the connection closes), so the client gets a clear answer and
        # every hook runs as for any response
        handler = getattr(ctx.master.addons.get("proxyserver"), "connections", {}).get(
            flow.client_conn.id)
        if handler is None or flow.server_conn not in getattr(handler, "transports", {}):
            flow.kill()
            return
        body = json.dumps({"error": {"message": f"kvgate: engine {meta['endpoint']} sent no "
                           f"response headers within {gw.kv.response_headers_timeout:g}s",
                           "type": "gateway_timeout", "code": 504}}).encode()
        raw = (b"HTTP/1.1 504 Gateway Timeout\r\ncontent-type: application/json\r\n"
               b"x-kvcache-timeout: response-headers\r\nconnection: close\r\n"
               b"content-length: %d\r\n\r\n" % len(body)) + body
        task = asyncio.get_running_loop().create_task(
            handler.server_event(events.DataReceived(flow.server_conn, raw)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Before mitmproxy connects to the engine a request was routed to: if that engine
        refuses connections, the request never reached it, so it goes to another healthy
        one instead of failing with 502. mitmproxy cannot retry its own connect (its
        connect error is final for the flow: tests/integration/test_engine_faults.py),
        so this asks first, with a connect of its own."""
        flow = self._connecting.get(data.client.id)
        gw = self._flows.get(flow.id) if flow is not None else None
        if flow is None or gw is None or not gw.kv.retry_refused_connects:
            return
        meta = flow.metadata.get(META)
        if not meta or data.server.address != (flow.request.host, flow.request.port):
            return
        cluster = gw.fleet.clusters[meta["cluster"]]
        tried: set[str] = set()
        while True:
            ep = cluster.by_id.get(meta["endpoint"])
            if ep is None:
                return
            tried.add(ep.id)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port),
                                                   CONNECT_PROBE_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    return  # unknown: mitmproxy's own connect decides
                self._eject_now(gw, ep.id, f"connect refused ({exc.strerror or exc})")
            else:
                writer.close()
                return
            others = [e for e in cluster.endpoints if e.id not in tried and cluster.healthy(e.id)]
            other = min(others, key=lambda e: cluster.inflight.get(e.id, 0), default=None)
            if other is None:
                return  # nowhere else: mitmproxy connects and fails as before
            gw.counters.inc("routes.connect_retried")
            cluster.end(ep.id)
            cluster.begin(other.id)
            meta["endpoint"] = other.id
            meta["detail"] = f"{ep.id} refused the connection"
            flow.request.host, flow.request.port = other.host, other.port
            flow.request.host_header = other.hostport
            data.server.address = (other.host, other.port)
