"""The mitmproxy glue: options, hooks, flow annotations (comment, fallback mark, kept SSE
answers) and the LLM content view's registration. The pipeline is ``gateway``."""

from __future__ import annotations

import json
import logging
import threading
from operator import itemgetter
from typing import Any

from mitmproxy import command, ctx, exceptions, hooks, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from mitmproxy.utils import human

from . import config, contentview
from .engine_faults import META, EngineFaults
from .gateway import Gateway
from .observability.llm_view import StreamTap
from .policies.base import BALANCER, DISABLED, FALLBACK
from .request.routed import Routed

log = logging.getLogger("kvgate")

FALLBACK_MARK = ":warning:"
"""``flow.marked`` of a routed flow that fell back (mitmweb shows ⚠; filter ``~marked``)."""
COMMENT_DETAIL_MAX = 40
"""The flow comment is a list column: the full ``detail`` is in the metadata and LLM view."""


def spare_module_misses(namespace: dict[str, Any]) -> None:
    """Bind every mitmproxy event name a script module lacks to None.

    mitmproxy looks each event's name up on a script's module before it reaches the
    module's addons (``addonmanager._iter_hooks``). On Python 3.11 a miss on a module
    builds and formats an AttributeError (~1 us, 25x a hit); over the ~20 events of a
    proxied request that is ~0.1 M instructions, over 1% of the request. A name bound to
    None is a dict hit that mitmproxy skips as "no hook", exactly as it skips a miss.
    """
    import mitmproxy.addons  # noqa: F401  (defines every event mitmdump can dispatch)

    for name in hooks.all_hooks:
        namespace.setdefault(name, None)


def _header(headers: http.Headers, name: bytes) -> str:
    """The first value of a header: Headers.get converts every field it passes; this
    compares raw bytes, which matters on a path taken by every request."""
    for key, value in headers.fields:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _host_header(req: http.Request) -> str | None:
    """``req.host_header``; for HTTP/1 read off the raw fields (see ``_header``)."""
    if req.data.http_version.startswith(b"HTTP/1"):
        return _header(req.data.headers, b"host") or None
    return req.host_header


def _unparseable(gw: Gateway, req: http.Request) -> str | None:
    """Why this request's body is not read (None: read it)."""
    data = req.data  # raw fields: the properties are calls that decode
    if data.method != b"POST":
        return "not a POST"
    fields = data.headers.fields
    # most requests have no Content-Encoding: prove it in C before a scan in Python
    if b"content-encoding" in b"\n".join(map(itemgetter(0), fields)).lower():
        encoding = _header(req.headers, b"content-encoding").strip().lower()
        if encoding not in ("", "identity"):
            return "compressed body"
    if data.content is None:
        return "streamed body"
    if len(data.content) > gw.kv.max_body_bytes:
        return "body above max_body_bytes"
    return None


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


def _connect_lazily() -> None:
    """mitmproxy's default (``connection_strategy=eager``) connects each client's
    connection to the reverse-mode target before any request is read: with kvgate
    choosing the engine per request, a dead target would fail every request, whichever
    engine kvgate picks. Lazy connects to the engine kvgate chose."""
    try:
        if ctx.options.connection_strategy == "eager":
            ctx.options.update(connection_strategy="lazy")
            log.info("[kvcache] connection_strategy set to lazy: kvgate picks each "
                     "request's engine, mitmproxy connects to it then")
    except (AttributeError, KeyError, exceptions.OptionsError):  # no proxy server loaded
        return


class KVCacheAddon:
    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        self._running = False
        self._cancels: dict[str, threading.Event] = {}
        # the gateway each routed flow counted itself in: after a reload, flows still in
        # flight end their counts there, not in the new gateway
        self._owners: dict[str, Gateway] = {}
        self._keep_streamed = 1024 * 1024  # kvcache_keep_streamed, in bytes
        self._view: contentview.LLMView | None = None
        # engine faults are a concern of their own, called from these hooks (one addon
        # for mitmproxy to dispatch every event to, not two)
        self.faults = EngineFaults()

    # ------------------------------------------------------------ options

    def load(self, loader: Any) -> None:
        loader.add_option(
            "kvcache_config",
            str,
            "",
            "Path to the kvgate config (seed, Pixiu or kvgate shape). Empty: pass-through.",
        )
        loader.add_option(
            "kvcache_keep_streamed",
            str,
            "1m",
            "Keep the first this many bytes of each streamed (SSE) answer on its flow, for "
            "the LLM view, mitmweb and saved flows (mitmproxy keeps none of a streamed "
            "body). 0: keep none.",
        )
        # the LLM content view (mitmweb, console): chosen by "auto" for LLM API bodies
        self._view = contentview.register()

    def configure(self, updated: set[str]) -> None:
        if "kvcache_keep_streamed" in updated:
            try:
                keep = human.parse_size(ctx.options.kvcache_keep_streamed)
            except ValueError:
                keep = None
            if keep is None or keep < 0:
                raise exceptions.OptionsError(
                    f"kvcache_keep_streamed={ctx.options.kvcache_keep_streamed!r}: "
                    "a size such as 1m, 256k or 0")
            self._keep_streamed = keep
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
        _connect_lazily()
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
        self.faults.close()
        contentview.unregister(self._view)
        self._view = None
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

    @staticmethod
    def _not_read(gw: Gateway, cluster: str, req: http.Request) -> Routed | None:
        """The route of a request whose body is not read (filter off, not routable);
        None for one the pipeline reads (not a coroutine: that is one more per request)."""
        if not gw.kv.enabled:
            return Routed(gw.balancer(cluster, DISABLED))
        reason = _unparseable(gw, req)
        if reason is not None:
            gw.counters.inc("requests.not_parsed")
            return Routed(gw.balancer(cluster, BALANCER, reason))
        return None

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
            routed = self._not_read(gw, cluster, flow.request)
            if routed is None:
                body = flow.request.data.content
                assert body is not None  # _not_read: a streamed body is not read
                routed = await gw.route_async(cluster, body)
            self._apply(gw, cluster, flow, routed)
        except Exception:  # a hook must never take a flow down: forward it untouched
            log.exception("[kvcache] routing error; request forwarded unchanged")

    def _apply(self, gw: Gateway, cluster: str, flow: http.HTTPFlow, routed: Routed) -> None:
        decision = routed.decision
        assert decision is not None
        ep = decision.endpoint
        req = flow.request
        data = req.data  # read off the raw fields: the properties are calls (and decodes)
        if data.port != ep.port or data.host != ep.host or data.scheme != ep.scheme_bytes:
            req.scheme = ep.scheme
            req.host = ep.host
            req.port = ep.port
        if _host_header(req) != ep.hostport:
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
        # the runner-up and its predicted TTFT, from policies that report one
        runner_up = decision.runner_up
        if runner_up:
            meta["runner_up"] = runner_up
        flow.metadata[META] = meta
        comment = f"kvcache: {decision.reason} -> {ep.id}"
        if decision.matched_tokens:
            comment += f" ({decision.matched_tokens} cached tokens)"
        elif decision.detail:
            detail = decision.detail
            if len(detail) > COMMENT_DETAIL_MAX:
                detail = detail[:COMMENT_DETAIL_MAX - 1] + "…"
            comment += f" ({detail})"
        flow.comment = comment
        if decision.reason == FALLBACK and not flow.marked:
            flow.marked = FALLBACK_MARK  # the flows a filter should find: ~marked
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[kvcache] %s %s key=%s", req.path, comment, meta.get("prompt_hash"))
        cancel = gw.background(routed)
        if cancel is not None:
            self._cancels[flow.id] = cancel
        self.faults.routed(flow, gw)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        await self.faults.server_connect(data)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self.faults.headers_in(flow)
            resp = flow.response
            if resp is None:
                return
            if _header(resp.data.headers, b"content-type").lower().startswith(
                    "text/event-stream"):
                resp.stream = self._stream(flow, resp)
            gw = self.gateway
            meta = flow.metadata.get(META)
            if gw is not None and meta and gw.kv.debug_headers:
                resp.headers["x-kvcache-endpoint"] = meta["endpoint"]
                resp.headers["x-kvcache-route"] = meta["route"]
                resp.headers["x-kvcache-matched-tokens"] = str(meta["matched_tokens"])
        except Exception:
            log.exception("[kvcache] responseheaders error")

    def _stream(self, flow: http.HTTPFlow, resp: http.Response) -> Any:
        """Stream an SSE answer through; keep a bounded copy of it for the LLM view
        (a streamed body is otherwise not kept) unless kvcache_keep_streamed is 0."""
        if callable(resp.stream):  # another addon's: leave it be
            return resp.stream
        if not self._keep_streamed or not flow.live:  # a flow read from a file has its body
            return True
        facts: dict[str, Any] = {}
        flow.metadata[contentview.STREAM_META] = facts
        return StreamTap(resp.data, facts, self._keep_streamed)

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

    def owner(self, flow: http.HTTPFlow) -> Gateway | None:
        """The gateway that routed this flow (a reload may have replaced it since)."""
        return self._owners.get(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        try:
            self.faults.answered(flow)
            self._finish(flow)
        except Exception:
            log.exception("[kvcache] response hook error")

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            if flow.response is not None and isinstance(flow.response.stream, StreamTap):
                flow.response.stream.finish()  # a stream cut short: keep what came
            cancel = self._cancels.get(flow.id)
            if cancel is not None:
                cancel.set()
            self.faults.failed(flow)
            self._finish(flow)
        except Exception:
            log.exception("[kvcache] error hook error")

    # ------------------------------------------------------------ commands

    @command.command("kvcache.stats")
    def stats(self) -> str:
        """Token-cache, routing, breaker and background figures as JSON."""
        if self.gateway is None:
            return json.dumps({"loaded": False})
        text = json.dumps(self.gateway.stats(), sort_keys=True)
        log.info("[kvcache] stats %s", text)
        return text
