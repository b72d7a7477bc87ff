"""Prometheus metrics on an admin port (prometheus-client), read from the gateway's state.

Off unless ``metrics_port`` is set; bound to ``metrics_host`` (127.0.0.1 by default).
Each gateway has its own registry, so a config reload never registers a name twice.
"""

from __future__ import annotations

import socket
import threading
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from .stats import Sources

_BREAKER = {"closed": 0, "half_open": 1, "open": 2}
RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# how often the admin server's loop looks for a shutdown: closing it (a config reload, on
# the event loop) waits up to this long; prometheus-client's start_http_server polls
# every 0.5 s, which stalled every flow for up to half a second on a reload
SHUTDOWN_POLL_S = 0.02


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass  # a scrape is not worth a line on the proxy's stderr


class RatioHistogram:
    """A histogram observed on every routed request, on the event loop only.

    prometheus-client's ``Histogram.observe`` takes a lock twice and walks the buckets in
    Python (~8 000 instructions, 3% of kvgate's own work on a request); this is one bisect
    and two additions. Counts are per bucket here, cumulative when exported.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), list(self.counts), strict=True):
            total += n
            buckets.append((bound, total))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class Exporter(Collector):
    """Reads the parts it is given at scrape time; it holds no figures of its own but the
    request-path latency histograms."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=True)
        self.lookup_seconds = Histogram(
            "kvgate_lookup_seconds", "LMCache /lookup latency on the request path",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokenize_seconds = Histogram(
            "kvgate_tokenize_seconds", "vLLM /tokenize latency on the request path",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.matched_ratio = RatioHistogram(RATIO_BUCKETS)
        self.registry.register(self)
        self._server: Any = None

    def serve(self, host: str, port: int) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("AdminServer", (ThreadingWSGIServer,), {"address_family": family})
        server = make_server(host, port, make_wsgi_app(self.registry), server_class,
                             handler_class=_Quiet)
        threading.Thread(target=server.serve_forever, args=(SHUTDOWN_POLL_S,), daemon=True,
                         name="kvgate-admin").start()
        self._server = server

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        src = self.sources
        groups = src.counters.grouped()
        c = CounterMetricFamily("kvgate_routing_decisions", "routing decisions by reason",
                                labels=["reason"])
        for reason, n in groups.get("routes", {}).items():
            c.add_metric([reason], n)
        yield c
        c = CounterMetricFamily("kvgate_strategy_actions", "cache actions by kind and result",
                                labels=["action", "result"])
        for key, n in groups.get("actions", {}).items():
            action, _, result = key.partition("_")
            c.add_metric([action, result], n)
        yield c
        c = CounterMetricFamily("kvgate_helper_calls", "request-path helper calls",
                                labels=["helper", "result"])
        for helper in ("lookup", "tokenize", "discovery"):
            for key, n in groups.get(helper, {}).items():
                c.add_metric([helper, key], n)
        yield c
        g = GaugeMetricFamily("kvgate_breaker_state", "0 closed, 1 half-open, 2 open",
                              labels=["breaker"])
        for name, br in src.breakers.items():
            g.add_metric([name], _BREAKER[br.state.value])
        yield g
        bg = src.background.snapshot()
        yield GaugeMetricFamily("kvgate_background_queue_depth",
                                "background tasks queued or running", value=bg["pending"])
        yield CounterMetricFamily("kvgate_background_dropped", "tasks dropped: pool full",
                                  value=bg["dropped"])
        tc = src.token_cache.snapshot()
        yield GaugeMetricFamily("kvgate_token_cache_hit_ratio", "token-cache hits / lookups",
                                value=tc["hit_rate"])
        inflight = GaugeMetricFamily("kvgate_endpoint_inflight", "requests in flight",
                                     labels=["cluster", "endpoint"])
        healthy = GaugeMetricFamily("kvgate_endpoint_healthy", "1 in rotation, 0 ejected",
                                    labels=["cluster", "endpoint"])
        for name, cluster in src.clusters.items():
            for ep in cluster.endpoints:
                inflight.add_metric([name, ep.id], cluster.inflight.get(ep.id, 0))
                healthy.add_metric([name, ep.id], 1.0 if src.health.is_healthy(ep.id) else 0.0)
        yield inflight
        yield healthy
        yield self.matched_ratio.family(
            "kvgate_matched_token_ratio", "cached tokens on the chosen endpoint / prompt tokens")
