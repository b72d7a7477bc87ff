"""What a routing policy sees of one cluster: its endpoints, their health and their load."""

from __future__ import annotations

import time
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
        self.up = cluster.is_up  # healthy, for ids of the cluster's own endpoints
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
        """Completions a new request waits for before it gets a batch slot, per endpoint.

        Requests in flight only delay ours once the engine's batch slots are full, but from
        then on ours waits for one completion more than are queued: with every slot taken
        and nobody queued it still waits for one to free (counted as none, hot traffic went
        into full holders and their queue made hot_prefix's tail). Queued is what is in
        flight beyond the slots learnt from /metrics, or the engine's own waiting queue
        (other gateways' requests included) if larger.
        """
        # batch_slots and fresh inline (same rules): this runs per endpoint per request
        monitor, cluster = self.monitor, self.cluster
        stats, full, seen = monitor.stats, monitor.full_slots, monitor.slots
        inflight, finished = cluster.inflight, cluster.finished
        floor = self.min_batch_slots
        now = max_age = 0.0
        if stats:
            now, max_age = time.monotonic(), monitor.max_age
        out: dict[str, float] = {}
        for ep in cluster.endpoints:
            eid = ep.id
            slots = full.get(eid)
            if slots is None:
                slots = seen.get(eid, 0.0)
                if slots < floor:
                    slots = floor
            queue = inflight.get(eid, 0) - slots + 1.0
            st = stats.get(eid)
            if st is not None and now - st.at <= max_age:
                # less what has finished since it was read: a queue read half a second
                # ago must not keep traffic off a drained engine
                waiting = st.waiting - (finished.get(eid, 0) - st.done)
                if waiting > 0.0 and waiting + 1.0 > queue:
                    queue = waiting + 1.0
            out[eid] = queue if queue > 0.0 else 0.0
        return out

    def load(self, endpoint_id: str) -> float:
        """Requests the engine has: what the gateway has in flight there, or what the engine
        reports running and waiting (other gateways' traffic included), whichever is more."""
        inflight = float(self.cluster.inflight.get(endpoint_id, 0))
        stats = self.monitor.fresh(endpoint_id)
        if stats is None:
            return inflight
        return max(inflight, stats.running + stats.waiting)
