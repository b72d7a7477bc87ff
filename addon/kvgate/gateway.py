"""The request pipeline, and the parts it is assembled from.

A request passes five stages, each in its own package:
  1. read the body                   request.parsing
  2. find its tokens                 tokens.finder
  3. find where its prefix lives     placement.lookup_cache, and placement.sent: where
                                     the gateway sent prompts, before LMCache knows
  4. pick an endpoint                policies (one file each, chosen by ``policy:``)
  5. act in the background           cache_management
Each stage may settle the request (unparsed, helper down, no tokens): the rest is skipped.
Around them: fleet (clusters, health, engine metrics, discovery), clients (LMCache,
tokenizer, HTTP) and observability. The mitmproxy glue is ``addon``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import policies
from .cache_management.manager import CacheManager, Job
from .clients.helpers import HELPER_ERRORS, Helpers
from .config import GatewayConfig, Route
from .fleet.fleet import Fleet
from .observability.counters import Counters
from .observability.exporter import Exporter
from .observability.stats import Sources
from .placement.layout import Placement
from .placement.lookup_cache import LookupCache
from .placement.sent import SentRoutes
from .policies.base import BALANCER, FALLBACK, Decision, Prompt
from .request.parsing import NotParsed, parse_body
from .request.routed import Routed
from .tokens.cache import TokenCache
from .tokens.finder import TokenFinder, load_tokenizers

PARSE_INLINE_MAX = 128 * 1024  # a bigger body is parsed off the event loop


class Gateway:
    """Built without side effects (a bad config costs nothing); ``start`` opens threads
    and the admin port, ``close`` ends them."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.route_for: Callable[[str], Route | None] = cfg.route_for  # bound: per request
        kv = self.kv = cfg.kvcache
        self.counters = Counters()
        self.routing_budget = min(kv.lookup_routing_timeout, kv.request_timeout)
        self.helpers = Helpers(kv)
        self.fleet = Fleet(cfg, self.helpers.registry, self.counters)
        # one policy per cluster: a policy's state (a rotation, a tree) is its cluster's
        self.policies = {n: policies.create(kv.policy, kv.policies.get(kv.policy))
                         for n in self.fleet.clusters}
        self.routing_pool = ThreadPoolExecutor(kv.routing_workers, "kvgate-route")
        self.token_cache = TokenCache(kv.token_cache.enabled, kv.token_cache.capacity,
                                      kv.token_cache.ttl, kv.token_cache.token_budget)
        self.tokens = TokenFinder(self.token_cache, load_tokenizers(kv.tokenizers),
                                  self.helpers.aio_tokenizer, self.routing_pool, self.counters,
                                  timer=lambda: self.exporter.tokenize_seconds.time())
        self.lookups = LookupCache(self.helpers.lookup, kv.lookup_cache_ttl, kv.lookup_stale_ttl,
                                   kv.routing_workers, self.counters,
                                   timer=lambda: self.exporter.lookup_seconds.time())
        self.sent = SentRoutes(kv.prefix_index_size, kv.recent_routes_window, self.lookups)
        self.fleet.health.on_down = self.sent.forget  # an engine back from the dead is empty
        self.cache = CacheManager(kv, self.token_cache, self.tokens.local_tokens, self.helpers,
                                  self.fleet.monitor, self.counters)
        h, f = self.helpers, self.fleet
        self.exporter = Exporter(Sources(
            kv.enabled, self.counters, h.breakers,
            lambda: {**h.lmcache.unsupported, **h.actions.unsupported}, self.cache.pool,
            self.token_cache, self.cache.hot, f.clusters, f.health,
            lambda: f.discovery.snapshot() if f.discovery is not None else None))

    def start(self) -> None:
        """The admin port first (it can fail: port taken, bad host), then the threads."""
        if self.kv.metrics_port:
            self.exporter.serve(self.kv.metrics_host, self.kv.metrics_port)
        self.fleet.start()

    # ------------------------------------------------------------ the request path

    def route(self, cluster_name: str, body: bytes) -> Routed:
        """Blocking form of ``route_async`` for threads and tests (its own event loop)."""

        async def once() -> Routed:
            try:
                return await self.route_async(cluster_name, body)
            finally:  # the loop ends with this call: so do its lookups and connections
                loop = asyncio.get_running_loop()
                await asyncio.gather(*self.lookups.in_flight(loop), return_exceptions=True)
                self.helpers.close_loop()

        return asyncio.run(once())

    async def route_async(self, cluster_name: str, body: bytes) -> Routed:
        """One request through the stages, on the event loop, within the routing budget."""
        # 1. read the body (a big one off the loop: its JSON parse would stall every flow)
        routed = (self.prepare(cluster_name, body) if len(body) <= PARSE_INLINE_MAX
                  else await self._read_off_loop(cluster_name, body))
        if routed.decision is not None:
            return routed
        if not self.policies[cluster_name].needs_placements:  # it reads the text alone
            return self._choose(cluster_name, routed)
        assert routed.parsed is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + self.routing_budget
        probe = routed.probe
        if probe is None and self.kv.route_on_miss:  # 2. find its tokens
            try:
                routed.tokens = await self.tokens.tokenize(routed.parsed, routed.key, body, end)
            except HELPER_ERRORS as exc:
                return self._fallback(cluster_name, routed, f"tokenize: {exc}")
            probe = routed.probe
        if probe is None:  # the seed's rule: no tokens cached, no routing
            return self._settle(routed, self.balancer(cluster_name, BALANCER,
                                                      "token cache miss"))
        try:  # 3. find where its prefix lives (a recent answer: no coroutine, no wait)
            found = (self.lookups.reuse(routed.key, probe, self.routing_budget)
                     if routed.tokens is not None else None)
            placements, how = found if found is not None else await self.lookups.find(
                routed.key, probe, False, end - loop.time(), self.routing_budget)
        except HELPER_ERRORS as exc:
            self.counters.inc("lookup.routing_failed")
            return self._fallback(cluster_name, routed, f"lookup: {exc}")
        except Exception as exc:  # nothing from a helper's answer escapes the routing step
            self.counters.inc("lookup.routing_failed")
            return self._fallback(cluster_name, routed, f"lookup: {type(exc).__name__}")
        self.counters.inc_on_loop(f"lookup.{how}")
        if how == "routing_ok":  # a fresh answer: add what LMCache cannot know yet
            placements, added = self.sent.add_recent(probe, placements)
            if added:
                self.counters.inc("lookup.recent_routes")
        routed.placements = placements
        return self._choose(cluster_name, routed, placements)  # 4. pick an endpoint

    async def _read_off_loop(self, cluster_name: str, body: bytes) -> Routed:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self.routing_pool, self.prepare, cluster_name, body, True),
                self.routing_budget)
        except TimeoutError:
            return Routed(self.balancer(cluster_name, FALLBACK, "parse budget"))

    def prepare(self, cluster_name: str, body: bytes, off_loop: bool = False) -> Routed:
        """Parse, count and find tokens we already have. Decided here only when unparsed."""
        if self.kv.signals == "process":  # the seed's signals read the request rate
            self.cache.process_load.record_request()
        try:
            parsed = parse_body(body, self.kv.default_model, off_loop)
        except NotParsed as exc:
            self.counters.inc("requests.not_parsed")
            return Routed(self.balancer(cluster_name, BALANCER, str(exc), on_loop=not off_loop))
        key = parsed.key
        if self.cache.tracks_hotness:
            self.cache.hot.record(key)
        tokens, prefix = self.tokens.known(parsed, key, self.kv.route_on_miss)
        # the body is kept only while it may still be needed for /tokenize
        return Routed(None, parsed=parsed, key=key, body=body if tokens is None else b"",
                      tokens=tokens, prefix_tokens=prefix)

    def _choose(self, cluster_name: str, routed: Routed,
                placements: list[Placement] | None = None) -> Routed:
        assert routed.parsed is not None
        policy = self.policies[cluster_name]
        probe = routed.probe
        n = len(probe) if probe is not None else 0
        prompt = Prompt(routed.parsed.key_text, routed.tokens, n)
        decision = policy.choose(prompt, placements or [], self.fleet.views[cluster_name])
        if policy.needs_placements and routed.tokens is not None and n:
            # the prompt's own tokens only: an earlier turn's would overstate the share
            self.exporter.matched_ratio.observe(min(1.0, decision.matched_tokens / n))
        return self._settle(routed, self._count(decision))

    def _fallback(self, cluster_name: str, routed: Routed, why: str) -> Routed:
        """Without LMCache: the endpoint that last served this prompt's longest known prefix."""
        assert routed.parsed is not None
        cluster = self.fleet.clusters[cluster_name]
        holder = self.sent.last_holder(routed.parsed.key_text)
        ep = cluster.by_id.get(holder) if holder is not None else None  # one snapshot
        if ep is not None and cluster.healthy(ep.id):
            self.counters.inc("routes.fallback_index")
            decision = self._count(Decision(ep, FALLBACK, 0, f"prefix index ({why})"))
        else:
            decision = self.balancer(cluster_name, FALLBACK, why)
        return self._settle(routed, decision)

    def balancer(self, cluster_name: str, reason: str, detail: str = "",
                 on_loop: bool = True) -> Decision:
        return self._count(Decision(self.fleet.clusters[cluster_name].round_robin(), reason, 0,
                                    detail), on_loop)

    def _count(self, decision: Decision, on_loop: bool = True) -> Decision:
        """Count the route (on the event loop without a lock: ``inc_on_loop``)."""
        if on_loop:
            self.counters.inc_on_loop(f"routes.{decision.reason}")
        else:
            self.counters.inc(f"routes.{decision.reason}")
        return decision

    def _settle(self, routed: Routed, decision: Decision) -> Routed:
        """Remember where the prompt went: that engine will hold it before LMCache knows."""
        assert routed.parsed is not None
        routed.decision = decision
        self.sent.note(routed.key, routed.parsed.key_text, decision.endpoint.id, routed.probe,
                       routed.tokens, routed.placements)
        return routed

    # ------------------------------------------------------------ 5. act in the background

    def job(self, routed: Routed) -> Job | None:
        """What cache management is handed; None for a request that was not read."""
        if routed.parsed is None:
            return None
        served = routed.decision.endpoint.id if routed.decision is not None else None
        return Job(routed.key, routed.parsed, routed.body, routed.tokens, routed.placements,
                   served)

    def background(self, routed: Routed,
                   cancel: threading.Event | None = None) -> threading.Event | None:
        """Queue cache management for the request: the event (set when the client goes
        away) stops it. None when nothing was queued (nothing to do, or the pool is full)."""
        if routed.parsed is None or not self.cache.wanted(routed.tokens, routed.body):
            return None
        job = self.job(routed)
        assert job is not None
        cancel = cancel if cancel is not None else threading.Event()
        return cancel if self.cache.submit(job, cancel) else None

    # ------------------------------------------------------------ reporting, shutdown

    def stats(self) -> dict[str, Any]:
        return self.exporter.sources.snapshot()

    def close(self) -> None:
        self.fleet.stop()
        self.exporter.close()
        self.cache.close()
        self.routing_pool.shutdown(wait=False)  # queued parses finish; no flow sees a cancel
        self.helpers.close()
