"""The mitmproxy glue: options, hooks and flow annotations. The pipeline is ``gateway``."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.proxy import events, server_hooks
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from . import config
from .gateway import Gateway
from .policies.base import BALANCER, DISABLED
from .request.routed import Routed

log = logging.getLogger("kvgate")

META = "kvcache"


def _header(headers: http.Headers, name: bytes) -> str:
    """The first value of a header: Headers.get converts every field it passes; this
    compares raw bytes, which matters on a path taken by every request."""
    for key, value in headers.fields:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _unparseable(gw: Gateway, req: http.Request) -> str | None:
    """Why this request's body is not read (None: read it)."""
    if req.method != "POST":
        return "not a POST"
    encoding = _header(req.headers, b"content-encoding").strip().lower()
    if encoding not in ("", "identity"):
        return "compressed body"
    if req.raw_content is None:
        return "streamed body"
    if len(req.raw_content) > gw.kv.max_body_bytes:
        return "body above max_body_bytes"
    return None


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


_ALL_INTERFACES = ("", "0.0.0.0", "::")


def _warn_if_exposed() -> None:
    """One WARNING when a listener is bound to every interface: the gateway (and with
    it the engines) is then open to the network, which is rarely what was meant."""
    try:
        default = ctx.options.listen_host
        specs = [ProxyMode.parse(m) for m in ctx.options.mode]
    except (AttributeError, KeyError, ValueError):  # options of a test context
        return
    exposed = sorted({m.full_spec for m in specs if m.listen_host(default) in _ALL_INTERFACES})
    if exposed:
        log.warning("[kvcache] listening on all interfaces (%s): anyone on the network can "
                    "use the gateway; pass --listen-host 127.0.0.1 unless that is meant",
                    ", ".join(exposed))


class KVCacheAddon:
    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        self._running = False
        self._cancels: dict[str, threading.Event] = {}
        # the gateway each routed flow counted itself in: after a reload, flows still in
        # flight end their counts there, not in the new gateway
        self._owners: dict[str, Gateway] = {}
        # flows sent to an engine and waiting for its response headers, oldest first:
        # flow id -> (deadline, flow, gateway); swept by _watch
        self._waiting: dict[str, tuple[float, http.HTTPFlow, Gateway]] = {}
        self._watcher: asyncio.Task[None] | None = None
        # client connection id -> the routed flow whose upstream it is about to open
        self._connecting: dict[str, http.HTTPFlow] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ options

    def load(self, loader: Any) -> None:
        loader.add_option(
            "kvcache_config",
            str,
            "",
            "Path to the kvgate config (seed, Pixiu or kvgate shape). Empty: pass-through.",
        )

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" in updated and hasattr(ctx.options, "termlog_verbosity"):
            # mitmproxy leaves the root logger at DEBUG; don't pay for our debug lines
            # on the request path unless someone is reading them.
            debug = ctx.options.termlog_verbosity == "debug"
            log.setLevel(logging.DEBUG if debug else logging.INFO)
        if "kvcache_config" not in updated:
            return
        path = ctx.options.kvcache_config
        if not path:
            self._swap(None)
            return
        try:
            cfg = config.load(path)
            if self.gateway is not None and self.gateway.cfg == cfg:
                return  # same settings (e.g. an option rolled back): keep caches and counters
            self._start(Gateway(cfg))
        except Exception as exc:  # ConfigError, or a shape the checks did not foresee
            if not isinstance(exc, config.ConfigError):
                exc = config.ConfigError("kvcache_config", path,
                                         f"cannot be used ({type(exc).__name__})")
            if self._running:
                # mitmproxy rolls the option back: the previous config stays in force.
                raise exceptions.OptionsError(str(exc)) from None
            # At start-up an error logged here makes mitmproxy exit (errorcheck addon).
            log.error("%s", exc)
            return
        kv = cfg.kvcache
        log.info(
            "[kvcache] config %s: enabled=%s, clusters=%s, route_on_miss=%s",
            cfg.source, kv.enabled,
            ", ".join(f"{n}({len(c.endpoints)})" for n, c in cfg.clusters.items()),
            kv.route_on_miss,
        )

    def _start(self, new: Gateway) -> None:
        """Start ``new`` and retire the old gateway; on failure the old one stays in force.

        The old gateway's admin port is freed first, so a reload may keep the same port."""
        old = self.gateway
        if old is not None:
            old.exporter.close()
        try:
            new.start()
        except Exception as exc:  # port taken, bad host name: the old gateway stays
            new.close()
            if old is not None and old.kv.metrics_port:
                try:
                    old.exporter.serve(old.kv.metrics_host, old.kv.metrics_port)
                except OSError:
                    log.warning("[kvcache] admin port %s could not be reopened",
                                old.kv.metrics_port)
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise config.ConfigError(
                "metrics_port", f"{new.kv.metrics_host}:{new.kv.metrics_port}",
                f"cannot listen: {why}") from None
        self._swap(new)

    def _swap(self, new: Gateway | None) -> None:
        old, self.gateway = self.gateway, new
        if old is None:
            return
        if new is None:  # shutting down: wait for it
            old.close()
        else:  # a reload: joining its threads must not stall the flows on the event loop
            threading.Thread(target=old.close, name="kvgate-retire", daemon=True).start()

    def running(self) -> None:
        self._running = True
        if self.gateway is not None:
            _warn_if_exposed()

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self._swap(None)

    # ------------------------------------------------------------ hooks

    async def _aimed_at_us(self, gw: Gateway, flow: http.HTTPFlow) -> bool:
        """Regular/other modes: only traffic aimed at our engines (by address: localhost
        and 127.0.0.1 are one engine) or at a virtual host is routed."""
        host, port = flow.request.host, flow.request.port
        vhosts = gw.kv.virtual_hosts
        if host in vhosts or f"{host}:{port}" in vhosts:
            return True
        return await gw.fleet.addresses.aimed_at_engine(host, port)

    async def _decide(self, gw: Gateway, cluster: str, flow: http.HTTPFlow) -> Routed:
        if not gw.kv.enabled:
            return Routed(gw.balancer(cluster, DISABLED))
        reason = _unparseable(gw, flow.request)
        if reason is not None:
            gw.counters.inc("requests.not_parsed")
            return Routed(gw.balancer(cluster, BALANCER, reason))
        body = flow.request.raw_content
        assert body is not None
        return await gw.route_async(cluster, body)

    async def request(self, flow: http.HTTPFlow) -> None:
        gw = self.gateway
        if gw is None or flow.response is not None or flow.error is not None:
            return
        try:
            route = gw.route_for(flow.request.path)
            if route is None:
                return
            if not isinstance(flow.client_conn.proxy_mode, ReverseMode) and not (
                    await self._aimed_at_us(gw, flow)):
                return
            cluster = route.cluster
            routed = await self._decide(gw, cluster, flow)
            self._apply(gw, cluster, flow, routed)
        except Exception:  # a hook must never take a flow down: forward it untouched
            log.exception("[kvcache] routing error; request forwarded unchanged")

    def _apply(self, gw: Gateway, cluster: str, flow: http.HTTPFlow, routed: Routed) -> None:
        decision = routed.decision
        assert decision is not None
        ep = decision.endpoint
        req = flow.request
        if req.port != ep.port or req.host != ep.host or req.scheme != ep.scheme:
            req.scheme = ep.scheme
            req.host = ep.host
            req.port = ep.port
        if req.host_header != ep.hostport:
            req.host_header = ep.hostport
        gw.fleet.clusters[cluster].begin(ep.id)
        self._owners[flow.id] = gw
        meta: dict[str, Any] = {
            "cluster": cluster,
            "endpoint": ep.id,
            "route": decision.reason,
            "matched_tokens": decision.matched_tokens,
        }
        if decision.detail:
            meta["detail"] = decision.detail
        if routed.parsed is not None:
            meta["model"] = routed.parsed.model
            meta["prompt_hash"] = routed.key[:16]
            if routed.tokens is not None:
                meta["prompt_tokens"] = len(routed.tokens)
        flow.metadata[META] = meta
        comment = f"kvcache: {decision.reason} -> {ep.id}"
        if decision.matched_tokens:
            comment += f" ({decision.matched_tokens} cached tokens)"
        elif decision.detail:
            comment += f" ({decision.detail})"
        flow.comment = comment
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[kvcache] %s %s key=%s", req.path, comment, meta.get("prompt_hash"))
        cancel = gw.background(routed)
        if cancel is not None:
            self._cancels[flow.id] = cancel
        self._connecting[flow.client_conn.id] = flow
        if gw.kv.response_headers_timeout > 0:
            self._waiting[flow.id] = (time.monotonic() + gw.kv.response_headers_timeout,
                                      flow, gw)
            if self._watcher is None:
                self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._waiting.pop(flow.id, None)
            self._connecting.pop(flow.client_conn.id, None)
            resp = flow.response
            if resp is None:
                return
            if _header(resp.headers, b"content-type").lower().startswith("text/event-stream"):
                resp.stream = True
            gw = self.gateway
            meta = flow.metadata.get(META)
            if gw is not None and meta and gw.kv.debug_headers:
                resp.headers["x-kvcache-endpoint"] = meta["endpoint"]
                resp.headers["x-kvcache-route"] = meta["route"]
                resp.headers["x-kvcache-matched-tokens"] = str(meta["matched_tokens"])
        except Exception:
            log.exception("[kvcache] responseheaders error")

    def _finish(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        gw = self._owners.pop(flow.id, None)
        self._cancels.pop(flow.id, None)
        if not meta or meta.get("finished") or gw is None:
            return
        meta["finished"] = True
        cluster = gw.fleet.clusters.get(meta["cluster"])
        if cluster is not None:
            cluster.end(meta["endpoint"])

    def response(self, flow: http.HTTPFlow) -> None:
        try:
            meta = flow.metadata.get(META)
            gw = self._owners.get(flow.id)
            if meta and gw is not None and flow.response is not None and not meta.get(
                    "timed_out"):
                if flow.response.status_code >= 500:
                    self._suspect(gw, meta["endpoint"], f"status {flow.response.status_code}")
                else:
                    gw.fleet.outliers.success(meta["endpoint"])
            self._finish(flow)
        except Exception:
            log.exception("[kvcache] response hook error")

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            cancel = self._cancels.get(flow.id)
            if cancel is not None:
                cancel.set()
            self._waiting.pop(flow.id, None)
            self._connecting.pop(flow.client_conn.id, None)
            meta = flow.metadata.get(META)
            gw = self._owners.get(flow.id)
            if meta and gw is not None and flow.error is not None and not meta.get(
                    "timed_out"):
                msg = flow.error.msg
                if _is_connect_failure(msg):
                    self._eject_now(gw, meta["endpoint"], msg)
                elif _is_server_failure(flow):  # a reset or a kill mid-answer
                    self._suspect(gw, meta["endpoint"], msg)
            self._finish(flow)
        except Exception:
            log.exception("[kvcache] error hook error")

    # ------------------------------------------------------------ engine faults

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
        gw = self._owners.get(flow.id) if flow is not None else None
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

    # ------------------------------------------------------------ commands

    @command.command("kvcache.stats")
    def stats(self) -> str:
        """Token-cache, routing, breaker and background figures as JSON."""
        if self.gateway is None:
            return json.dumps({"loaded": False})
        text = json.dumps(self.gateway.stats(), sort_keys=True)
        log.info("[kvcache] stats %s", text)
        return text
