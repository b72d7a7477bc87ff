"""What each engine is doing: ``GET /metrics`` (queue, batch, KV usage) and ``GET /health``.

One background thread asks every endpoint ``GET /health`` each ``health_check_interval``
(a refused connection ejects it in the health book at once, a slow or failing answer
after ``UNHEALTHY_AFTER`` checks in a row, as Kubernetes' failureThreshold does: a CPU
engine busy for half a second is not a dead one; a check that passes readmits it) and
``GET /metrics`` each ``metrics_interval`` (for the fleet's load view and cache
management). Never on the request path.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, replace

import urllib3

from .endpoint import Endpoint
from .health import HealthBook

log = logging.getLogger("kvgate")

UNHEALTHY_AFTER = 2
"""Failed health checks in a row (a timeout, a non-200 answer) before an endpoint is
ejected; a refused connection ejects at once."""


@dataclass(frozen=True)
class EngineStats:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    at: float = 0.0
    done: int = 0
    """Requests the gateway had seen the engine finish when these figures were read: what
    it finishes after that has left the waiting queue read then."""


_GAUGE = re.compile(rb"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


def parse_metrics(text: bytes) -> EngineStats:
    """vLLM's gauges, summed over model labels; the older KV gauge name accepted too."""
    sums: dict[bytes, float] = {}
    for name, value in _GAUGE.findall(text):
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    kv = sums.get(b"vllm:kv_cache_usage_perc", sums.get(b"vllm:gpu_cache_usage_perc", 0.0))
    return EngineStats(running=sums.get(b"vllm:num_requests_running", 0.0),
                       waiting=sums.get(b"vllm:num_requests_waiting", 0.0),
                       kv_usage=kv, at=time.monotonic())


class EngineMonitor:
    """One background thread polling every endpoint; never on the request path."""

    def __init__(self, endpoints: Sequence[Endpoint], book: HealthBook,
                 health_interval: float, metrics_interval: float) -> None:
        self.endpoints = list(endpoints)
        self.book = book
        self.health_interval = health_interval
        self.metrics_interval = metrics_interval
        self.stats: dict[str, EngineStats] = {}
        # requests finished per endpoint, as the gateway saw them (fleet.Fleet wires it)
        self.finished: Callable[[str], int] = lambda endpoint_id: 0
        self.slots: dict[str, float] = {}
        self.full_slots: dict[str, float] = {}
        self._failed_checks: dict[str, int] = {}
        self._pool = urllib3.PoolManager(num_pools=len(self.endpoints) + 8, maxsize=2,
                                         retries=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # endpoints are asked side by side: one hung engine must not delay the verdict
        # on the others past the interval
        self._workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kvgate-poll")

    def start(self) -> None:
        if self.health_interval <= 0 and self.metrics_interval <= 0:
            return
        self._thread = threading.Thread(target=self._run, daemon=True, name="kvgate-monitor")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._pool.clear()

    @property
    def max_age(self) -> float:
        """Figures older than this say nothing about now: three missed polls, at least 1 s."""
        return max(3 * self.metrics_interval, 1.0)

    def batch_slots(self, endpoint_id: str, at_least: float) -> float:
        """Sequences the engine runs at once before it queues (vLLM's max_num_seqs is not
        in /metrics). Once the engine has been seen full (requests waiting), the most it
        ran then: that is its limit, however small. Until then the most seen running, but
        at least ``at_least``."""
        full = self.full_slots.get(endpoint_id)
        if full is not None:
            return full
        return max(self.slots.get(endpoint_id, 0.0), at_least)

    def fresh(self, endpoint_id: str, max_age: float | None = None) -> EngineStats | None:
        st = self.stats.get(endpoint_id)
        if st is None:  # never read (or metrics off): asked per endpoint per request
            return None
        age = self.max_age if max_age is None else max_age
        return st if time.monotonic() - st.at <= age else None

    def _get(self, ep: Endpoint, path: str, timeout: float,
             fresh: bool = False) -> urllib3.BaseHTTPResponse | OSError | None:
        """The answer; the error if the connection was refused; None if it failed later."""
        try:
            return self._pool.request(
                "GET", ep.url + path, timeout=timeout, retries=False, redirect=False,
                # a health check must prove the engine still accepts connections
                headers={"Connection": "close"} if fresh else None,
            )
        except urllib3.exceptions.NewConnectionError as e:
            return OSError(str(e))
        except (urllib3.exceptions.HTTPError, OSError):
            return None

    def check_health(self, ep: Endpoint) -> None:
        resp = self._get(ep, "/health", max(0.2, min(self.health_interval, 1.0)), fresh=True)
        if resp is not None and not isinstance(resp, OSError) and resp.status == 200:
            self._failed_checks.pop(ep.id, None)
            if self.book.checks_down(ep.id):
                log.warning("[kvcache] endpoint %s is healthy again", ep.id)
            self.book.mark_up(ep.id)
            return
        failed = self._failed_checks[ep.id] = self._failed_checks.get(ep.id, 0) + 1
        if not isinstance(resp, OSError) and failed < UNHEALTHY_AFTER:
            return  # slow or failing once: ask again at the next interval
        if self.book.mark_down(ep.id, until_up=True):  # one line per ejection
            log.warning("[kvcache] endpoint %s failed its health check: ejected", ep.id)

    def poll_metrics(self, ep: Endpoint) -> None:
        resp = self._get(ep, "/metrics", max(0.2, min(self.metrics_interval, 1.0)))
        if resp is not None and not isinstance(resp, OSError) and resp.status == 200:
            st = self.stats[ep.id] = replace(parse_metrics(resp.data),
                                             done=self.finished(ep.id))
            # the most sequences it was seen running at once: its batch slots, as far as
            # we can tell (vLLM's max_num_seqs is not in /metrics)
            if st.running > self.slots.get(ep.id, 0.0):
                self.slots[ep.id] = st.running
            # requests waiting while these run: the engine is full at this many
            if st.waiting > 0 and st.running > self.full_slots.get(ep.id, 0.0):
                self.full_slots[ep.id] = st.running

    def _each(self, check: Callable[[Endpoint], None]) -> None:
        endpoints = self.endpoints  # discovery may replace the list meanwhile
        if len(endpoints) <= 1:
            for ep in endpoints:
                check(ep)
            return
        try:
            for fut in [self._workers.submit(check, ep) for ep in endpoints]:
                fut.result()
        except (RuntimeError, CancelledError):  # stopped meanwhile
            return

    def _run(self) -> None:
        inf = float("inf")
        next_health = 0.0 if self.health_interval > 0 else inf
        next_metrics = 0.0 if self.metrics_interval > 0 else inf
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_health:
                next_health = now + self.health_interval
                self._each(self.check_health)
            if now >= next_metrics:
                next_metrics = now + self.metrics_interval
                self._each(self.poll_metrics)
            # sleep until the next check is due: no wake-ups in between that would take
            # the GIL from the event loop
            self._stop.wait(max(0.01, min(next_health, next_metrics) - time.monotonic()))
