"""What a routing policy sees of one cluster: its endpoints, their health and their load."""

from __future__ import annotations

from collections.abc import Mapping

from .cluster import Cluster
from .endpoint import Endpoint
from .engine_metrics import EngineMonitor


class FleetView:
    """A live view (nothing is copied per request): policies read it while they choose."""

    def __init__(self, cluster: Cluster, monitor: EngineMonitor, min_batch_slots: int) -> None:
        self.cluster = cluster
        self.monitor = monitor
        self.min_batch_slots = float(min_batch_slots)
        # the cluster's own, bound: policies call these per endpoint per request
        self.healthy = cluster.healthy
        self.round_robin = cluster.round_robin

    @property
    def name(self) -> str:
        return self.cluster.name

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.cluster.endpoints

    @property
    def inflight(self) -> Mapping[str, int]:
        """Requests the gateway sent each endpoint that have not finished."""
        return self.cluster.inflight

    def ahead(self) -> dict[str, float]:
        """Requests a new one would queue behind, per endpoint.

        Requests in flight only delay ours once the engine's batch slots are full: with the
        slots learnt from /metrics, it is what is in flight beyond them, or the engine's own
        waiting queue (other gateways' requests included) if larger.
        """
        out: dict[str, float] = {}
        finished = self.cluster.finished
        for ep in self.cluster.endpoints:
            inflight = float(self.cluster.inflight.get(ep.id, 0))
            stats = self.monitor.fresh(ep.id)
            slots = self.monitor.batch_slots(ep.id, self.min_batch_slots)
            waiting = 0.0
            if stats is not None:  # less what has finished since it was read: a queue
                # read half a second ago must not keep traffic off a drained engine
                waiting = stats.waiting - (finished.get(ep.id, 0) - stats.done)
            out[ep.id] = max(inflight - slots, waiting, 0.0)
        return out

    def load(self, endpoint_id: str) -> float:
        """Requests the engine has: what the gateway has in flight there, or what the engine
        reports running and waiting (other gateways' traffic included), whichever is more."""
        inflight = float(self.cluster.inflight.get(endpoint_id, 0))
        stats = self.monitor.fresh(endpoint_id)
        if stats is None:
            return inflight
        return max(inflight, stats.running + stats.waiting)
