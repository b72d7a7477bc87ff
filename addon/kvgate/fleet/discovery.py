"""Engines learnt from the LMCache controller's registry (``/query_worker_info``).

The controller knows every registered worker: instance id and IP, but only the worker's
ZMQ port, not vLLM's HTTP port, so discovered engines are reached at ``engine_port``.
Asking for ``instance_id: "all"`` lists them all (lmcache 0.5.6 does this; REFERENCE.md
lists only the per-instance form). Configured endpoints are never changed or removed;
discovered ones join the configured cluster and leave when the controller forgets them.
A configured endpoint whose id the controller does not know is logged once: cache routing
can never pick it, which usually means its id is not its LMCache ``instance_id``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..clients.deadline import Deadline
from ..clients.http import CallError, HelperClient
from ..config import DiscoveryConfig
from ..observability.counters import Counters
from .cluster import Cluster
from .endpoint import Endpoint

log = logging.getLogger("kvgate")


def parse_workers(answer: Any) -> dict[str, str]:
    """instance id -> IP of its first registered worker; malformed entries are skipped."""
    infos = answer.get("worker_infos") if isinstance(answer, dict) else None
    out: dict[str, str] = {}
    if not isinstance(infos, list):
        raise CallError("query_worker_info: answer has no worker_infos", retryable=False)
    for info in infos:
        if not isinstance(info, dict):
            continue
        iid, ip = info.get("instance_id"), info.get("ip")
        if isinstance(iid, str) and iid and isinstance(ip, str) and ip and iid not in out:
            out[iid] = ip
    return out


def plan(configured: Iterable[str], discovered: dict[str, Endpoint], workers: dict[str, str],
         port: int, scheme: str) -> tuple[list[Endpoint], list[str]]:
    """(endpoints to add or re-address, discovered ids to drop) for one registry answer."""
    fixed = set(configured)
    add: list[Endpoint] = []
    if port:
        for iid, ip in sorted(workers.items()):
            if iid in fixed:
                continue
            ep = Endpoint(iid, ip, port, scheme)
            if discovered.get(iid) != ep:
                add.append(ep)
    drop = sorted(iid for iid in discovered if iid not in workers)
    return add, drop


class Discovery:
    """A background thread asking the controller's registry every ``interval``."""

    def __init__(self, cfg: DiscoveryConfig, client: HelperClient, cluster: Cluster,
                 on_change: Callable[[], None], counters: Counters) -> None:
        self.cfg = cfg
        self.client = client
        self.cluster = cluster
        self.on_change = on_change  # the monitor re-reads every cluster's endpoints
        self.counters = counters
        self.configured = {ep.id for ep in cluster.endpoints}
        self.discovered: dict[str, Endpoint] = {}
        self.unregistered: set[str] = set()
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.cfg.enabled and self.cfg.interval > 0:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="kvgate-discovery")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def poll(self) -> bool:
        """One registry read applied to the cluster; False when the controller did not say."""
        try:
            answer = self.client.post("/query_worker_info", {"instance_id": "all"},
                                      Deadline(min(2.0, max(self.cfg.interval, 0.2))))
            workers = parse_workers(answer)
        except Exception as exc:  # CallError, BreakerOpen: try again next round
            self.counters.inc("discovery.failed")
            log.debug("[kvcache] discovery: %s", exc)
            return False
        self.counters.inc("discovery.ok")
        add, drop = plan(self.configured, self.discovered, workers, self.cfg.engine_port,
                         self.cfg.engine_scheme)
        for ep in add:
            log.warning("[kvcache] discovery: engine %s at %s joins cluster %s", ep.id,
                        ep.hostport, self.cluster.name)
            self.cluster.add(ep)
            self.discovered[ep.id] = ep
        for iid in drop:
            log.warning("[kvcache] discovery: engine %s left the LMCache registry", iid)
            self.cluster.remove(iid)
            del self.discovered[iid]
        if not self.cfg.engine_port:
            for iid in sorted(set(workers) - self.configured - self._warned):
                self._warned.add(iid)
                log.warning("[kvcache] discovery: %s is registered with LMCache but "
                            "discovery.engine_port is not set: not added", iid)
        self.unregistered = self.configured - set(workers)
        for iid in sorted(self.unregistered - self._warned):
            self._warned.add(iid)
            log.warning("[kvcache] endpoint %s is not registered with the LMCache controller: "
                        "cache routing cannot pick it (is its id its instance_id?)", iid)
        if add or drop:
            self.on_change()
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"discovered": sorted(self.discovered), "unregistered": sorted(self.unregistered)}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.cfg.interval)
