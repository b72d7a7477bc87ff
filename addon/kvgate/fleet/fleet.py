"""The engines a gateway routes to: its clusters, their health, what each engine reports,
the engines discovery adds, and per cluster the view its routing policy reads."""

from __future__ import annotations

from ..clients.http import HelperClient
from ..config import GatewayConfig
from ..observability.counters import Counters
from .addresses import EngineAddresses
from .cluster import Cluster
from .discovery import Discovery
from .endpoint import Endpoint
from .engine_metrics import EngineMonitor
from .health import HealthBook
from .outliers import OutlierDetector
from .view import FleetView


class Fleet:
    def __init__(self, cfg: GatewayConfig, registry: HelperClient, counters: Counters) -> None:
        kv = cfg.kvcache
        self.health = HealthBook()
        self.outliers = OutlierDetector(kv.outlier_detection, self.health)
        self.clusters = {n: Cluster(c, self.health.is_healthy) for n, c in cfg.clusters.items()}
        self.monitor = EngineMonitor(
            self._endpoints(), self.health,
            kv.health_check_interval if kv.enabled else 0.0,
            kv.metrics_interval if kv.enabled else 0.0)
        # regular proxy mode: which requests are aimed at an engine (resolved in start)
        self.addresses = EngineAddresses(())
        self.monitor.finished = self._finished
        self.views = {n: FleetView(c, self.monitor, kv.min_batch_slots)
                      for n, c in self.clusters.items()}
        self.discovery: Discovery | None = None
        if kv.enabled and kv.discovery.enabled:
            self.discovery = Discovery(kv.discovery, registry,
                                       self.clusters[kv.discovery.cluster],
                                       self._endpoints_changed, counters)

    def _endpoints(self) -> list[Endpoint]:
        return [ep for c in self.clusters.values() for ep in c.endpoints]

    def _finished(self, endpoint_id: str) -> int:
        return sum(c.finished.get(endpoint_id, 0) for c in self.clusters.values())

    def _endpoints_changed(self) -> None:
        self.monitor.endpoints = self._endpoints()
        self.addresses.update(self.monitor.endpoints)

    def start(self) -> None:
        self.addresses.update(self._endpoints())
        self.monitor.start()
        if self.discovery is not None:
            self.discovery.start()

    def stop(self) -> None:
        if self.discovery is not None:
            self.discovery.stop()
        self.monitor.stop()
