"""One request's life without mitmproxy: parse, route within budget, queue the cache work.

The mitmproxy addon calls ``route`` on a thread of the routing pool and ``manage_cache``
through the bounded background pool; everything here is plain, testable Python.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cachetools import LRUCache, TTLCache

from . import routing, strategy
from .aioclient import AsyncHelper
from .background import BoundedPool
from .breaker import BreakerOpen, CircuitBreaker
from .client import CallError, HelperClient, Unsupported, make_pool
from .cluster import Cluster
from .config import ConfigError, GatewayConfig, Route
from .deadline import Cancelled, Deadline
from .discovery import Discovery
from .exporter import Exporter
from .health import EngineMonitor, HealthBook
from .hotness import HotTracker
from .lmcache import LMCacheClient, Placement, lookup_body, parse_layout
from .load import LoadMetrics, LoadMonitor
from .local_tokenizer import LocalTokenizer, TokenizerLoadError
from .metrics import Counters
from .parsing import NotParsed, ParsedRequest, cache_key, parse_body
from .prefix_index import PrefixIndex
from .tokens import TokenCache, Tokenizer, Tokens, tokens_from

log = logging.getLogger("kvgate")

PARSE_INLINE_MAX = 128 * 1024
CONTENT_BOOK_SIZE = 10_000  # prompts remembered per gateway for offload decisions
RECENT_LOOKUPS_SIZE = 10_000  # prompts whose lookup answer is reused for lookup_cache_ttl
ROUTING_ERRORS = (CallError, BreakerOpen, Cancelled, TimeoutError)


@dataclass
class Routed:
    """What routing learnt; handed on to the background work so nothing is done twice."""

    decision: routing.RouteDecision | None
    parsed: ParsedRequest | None = None
    key: str = ""
    tokens: Tokens | None = None
    placements: list[Placement] | None = None
    body: bytes = b""
    prefix_tokens: Tokens | None = None
    """Tokens of an earlier turn of this conversation: enough to look up where it lives."""
    notes: list[str] = field(default_factory=list)


def load_tokenizers(paths: dict[str, str]) -> dict[str, LocalTokenizer]:
    out: dict[str, LocalTokenizer] = {}
    for model, path in paths.items():
        try:
            out[model] = LocalTokenizer(path)
        except TokenizerLoadError as exc:
            raise ConfigError(f"tokenizers.{model}", path, str(exc)) from None
    return out


class Gateway:
    """Built without side effects (a bad config costs nothing); ``start`` opens threads
    and the admin port, ``close`` ends them."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        kv = cfg.kvcache
        self.kv = kv
        self.health = HealthBook()
        self.clusters = {
            name: Cluster(c, self.health.is_healthy) for name, c in cfg.clusters.items()
        }
        self.counters = Counters()
        self.pool = make_pool(kv)
        cb = kv.circuit_breaker
        self.tokenizer_breaker = CircuitBreaker(
            "tokenizer", cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls
        )
        self.lmcache_breaker = CircuitBreaker(
            "lmcache", cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls
        )
        self.tokenizer = Tokenizer(
            HelperClient("tokenizer", kv.vllm_endpoint, self.pool, self.tokenizer_breaker)
        )
        self.lmcache = LMCacheClient(
            HelperClient("lmcache", kv.lmcache_endpoint, self.pool, self.lmcache_breaker,
                         kv.retry)
        )
        # Actions (pin, compress, offload) have their own breaker: a controller refusing
        # an action must not stop the lookups that routing depends on.
        self.actions_breaker = CircuitBreaker(
            "lmcache-actions", cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls
        )
        self.actions = LMCacheClient(
            HelperClient("lmcache", kv.lmcache_endpoint, self.pool, self.actions_breaker,
                         kv.retry)
        )
        self.content: OrderedDict[str, tuple[str, Tokens]] = OrderedDict()
        self.aio_tokenizer = AsyncHelper("tokenizer", kv.vllm_endpoint, self.tokenizer_breaker,
                                         kv.routing_workers)
        self.aio_lmcache = AsyncHelper("lmcache", kv.lmcache_endpoint, self.lmcache_breaker,
                                       kv.routing_workers)
        self.local_tokenizers = load_tokenizers(kv.tokenizers)
        self.token_cache = TokenCache(kv.token_cache.enabled, kv.token_cache.capacity,
                                      kv.token_cache.ttl)
        self.hot = HotTracker(kv.hot_window, kv.hot_max_records, kv.hot_keys_cap)
        self.load = LoadMonitor()
        self.routing_pool = ThreadPoolExecutor(
            max_workers=kv.routing_workers, thread_name_prefix="kvgate-route"
        )
        self.cost_model = routing.CostModel(kv.prefill_ms, kv.load_ms, kv.queue_ms)
        self.prefix_index = PrefixIndex(kv.prefix_index_size)
        # key -> (expiry, placements): a lookup answer reused until its expiry, with where
        # the gateway sent the prompt since overlaid (that engine will hold it)
        self.recent_lookups: LRUCache[str, tuple[float, tuple[Placement, ...]]] = LRUCache(
            RECENT_LOOKUPS_SIZE)
        self._recent_lock = threading.Lock()
        # key -> the /lookup in flight for that prompt (on the loop that started it):
        # concurrent requests for one prompt share it, and stale answers renew through it
        self._asking: dict[str, asyncio.Future[list[Placement]]] = {}
        # key -> endpoint last written to the prefix index: a repeat routed the same way
        # skips the hashing; the pieces' recency is refreshed at least every 10 s
        self._indexed: TTLCache[str, str] = TTLCache(RECENT_LOOKUPS_SIZE, 10.0)
        self.monitor = EngineMonitor(
            [ep for c in cfg.clusters.values() for ep in c.endpoints], self.health,
            kv.health_check_interval if kv.enabled else 0.0,
            kv.metrics_interval if kv.enabled else 0.0,
        )
        self.discovery: Discovery | None = None
        if kv.enabled and kv.discovery.enabled:
            self.discovery = Discovery(
                kv.discovery,
                HelperClient("lmcache", kv.lmcache_endpoint, self.pool, CircuitBreaker(
                    "lmcache-registry", cb.failure_threshold, cb.recovery_timeout,
                    cb.half_open_max_calls)),
                self.clusters[kv.discovery.cluster], self._endpoints_changed, self.counters)
        self.exporter = Exporter(self)
        self.background = BoundedPool("kvgate-bg", kv.background_workers, kv.background_queue)
        self._closed = threading.Event()
        self._content_lock = threading.Lock()

    def start(self) -> None:
        """The admin port first (it can fail: port taken, bad host), then the threads."""
        if self.kv.metrics_port:
            self.exporter.serve(self.kv.metrics_host, self.kv.metrics_port)
        self.monitor.start()
        if self.discovery is not None:
            self.discovery.start()

    def _endpoints_changed(self) -> None:
        self.monitor.endpoints = [ep for c in self.clusters.values() for ep in c.endpoints]

    # ------------------------------------------------------------ request path

    def route_for(self, path: str) -> Route | None:
        return self.cfg.route_for(path)

    def balancer(self, cluster_name: str, reason: str, detail: str = "") -> routing.RouteDecision:
        ep = self.clusters[cluster_name].round_robin()
        self.counters.inc(f"routes.{reason}")
        return routing.RouteDecision(ep, reason, 0, detail)

    @property
    def routing_budget(self) -> float:
        return min(self.kv.lookup_routing_timeout, self.kv.request_timeout)

    def prepare(self, cluster_name: str, body: bytes) -> Routed:
        """Parse, count and find tokens we already have. Decided here only when unparsed."""
        self.load.record_request()
        try:
            parsed = parse_body(body, self.kv.default_model)
        except NotParsed as exc:
            self.counters.inc("requests.not_parsed")
            return Routed(self.balancer(cluster_name, routing.BALANCER, str(exc)))
        key = cache_key(parsed.model, parsed.key_text)
        self.hot.record(key)
        tokens = parsed.token_ids if parsed.token_ids is not None else self.token_cache.get(key)
        prefix: Tokens | None = None
        if tokens is None and self.kv.route_on_miss:  # the seed routes exact repeats only
            # a new turn: an earlier turn's prompt is a prefix of this one, and its tokens
            # are enough to ask LMCache where the conversation lives
            for earlier in parsed.prefixes:
                prefix = self.token_cache.peek(cache_key(parsed.model, earlier))
                if prefix is not None:
                    self.counters.inc("tokenize.prefix_reused")
                    break
        # the body is kept only while it may still be needed for /tokenize
        return Routed(None, parsed=parsed, key=key, body=body if tokens is None else b"",
                      tokens=tokens, prefix_tokens=prefix)

    def _tokenized(self, routed: Routed, tokens: Tokens | None, exc: Exception | None,
                   cluster_name: str, ok_counter: str = "tokenize.routing_ok") -> bool:
        """Record a routing-path tokenize; False when routing has to fall back."""
        if exc is not None:
            self.counters.inc("tokenize.routing_failed")
            routed.decision = self.fallback(cluster_name, routed, f"tokenize: {exc}")
            return False
        assert tokens is not None
        self.counters.inc(ok_counter)
        self.token_cache.put(routed.key, tokens)
        routed.tokens = tokens
        return True

    def finish(self, cluster_name: str, routed: Routed, placements: list[Placement] | None,
               exc: Exception | None, counter: str = "lookup.routing_ok") -> Routed:
        """Turn a lookup answer (or its failure) into the decision, by the configured policy."""
        if exc is not None:
            self.counters.inc("lookup.routing_failed")
            routed.decision = self.fallback(cluster_name, routed, f"lookup: {exc}")
            return self._remember(routed)
        assert placements is not None
        self.counters.inc(counter)
        routed.placements = placements
        cluster = self.clusters[cluster_name]
        policy = self.kv.policy
        if policy == "round_robin":
            routed.decision = self.balancer(cluster_name, routing.BALANCER, "policy")
            return self._remember(routed)
        if policy == "longest_prefix":
            best = routing.longest_prefix(placements, cluster.endpoints, cluster.healthy,
                                          cluster.inflight)
            if best is None:
                detail = "no cached prefix" if not placements else "holder unknown or unhealthy"
                routed.decision = self.balancer(cluster_name, routing.BALANCER, detail)
            else:
                self.counters.inc(f"routes.{routing.CACHE}")
                routed.decision = routing.RouteDecision(best[0], routing.CACHE, best[1])
            return self._remember(routed)
        n_tokens = len(routed.tokens or routed.prefix_tokens or ())
        ahead = self.ahead(cluster)
        pick = routing.cheapest(n_tokens, placements, cluster.endpoints, cluster.healthy,
                                ahead, self.cost_model, cluster.inflight)
        if pick is None:  # nothing healthy: the balancer still tries someone
            routed.decision = self.balancer(cluster_name, routing.BALANCER, "none healthy")
            return self._remember(routed)
        ep, matched, cost = pick
        if routed.tokens:  # an earlier turn's tokens would overstate the share
            self.exporter.matched_ratio.observe(min(1.0, matched / len(routed.tokens)))
        if matched > 0:
            self.counters.inc(f"routes.{routing.CACHE}")
            routed.decision = routing.RouteDecision(ep, routing.CACHE, matched,
                                                    f"predicted ttft {cost:.0f} ms")
            return self._remember(routed)
        # Nothing cached anywhere worth it: spread by rotation among the least loaded.
        rr = cluster.round_robin()
        if self.cost_model.ttft(n_tokens, 0, ahead.get(rr.id, 0.0)) <= cost + 1e-6:
            ep = rr
        self.counters.inc(f"routes.{routing.BALANCER}")
        detail = "no cached prefix" if not placements else "holder unknown or unhealthy"
        routed.decision = routing.RouteDecision(ep, routing.BALANCER, 0, detail)
        return self._remember(routed)

    def ahead(self, cluster: Cluster) -> dict[str, float]:
        """Requests a new one would queue behind, per endpoint.

        Requests in flight only delay ours once the engine's batch slots are full: with the
        slots learnt from /metrics (most seen running, at least ``min_batch_slots``), it is
        what is in flight beyond them, or the engine's own waiting queue if larger.
        """
        out: dict[str, float] = {}
        max_age = max(3 * self.kv.metrics_interval, 1.0)
        for ep in cluster.endpoints:
            inflight = float(cluster.inflight.get(ep.id, 0))
            stats = self.monitor.fresh(ep.id, max_age)
            slots = max(self.monitor.slots.get(ep.id, 0.0), float(self.kv.min_batch_slots))
            waiting = stats.waiting if stats is not None else 0.0
            out[ep.id] = max(inflight - slots, waiting, 0.0)
        return out

    def fallback(self, cluster_name: str, routed: Routed, why: str) -> routing.RouteDecision:
        """Without LMCache: the endpoint that last served this prompt's longest known prefix."""
        cluster = self.clusters[cluster_name]
        if routed.parsed is not None and self.kv.policy != "round_robin":
            known = self.prefix_index.best(routed.parsed.key_text)
            ep = cluster.by_id.get(known[0]) if known is not None else None  # one snapshot
            if ep is not None and cluster.healthy(ep.id):
                self.counters.inc("routes.fallback_index")
                self.counters.inc(f"routes.{routing.FALLBACK}")
                return routing.RouteDecision(ep, routing.FALLBACK, 0, f"prefix index ({why})")
        return self.balancer(cluster_name, routing.FALLBACK, why)

    def _remember(self, routed: Routed) -> Routed:
        if routed.parsed is not None and routed.decision is not None:
            ep_id = routed.decision.endpoint.id
            with self._recent_lock:
                known = self._indexed.get(routed.key) == ep_id
                if not known:
                    self._indexed[routed.key] = ep_id
            if not known:
                self.prefix_index.record(routed.parsed.key_text, ep_id)
            if routed.tokens is not None and routed.placements is not None:
                self._overlay(routed.key, routed.placements, routed.decision.endpoint.id,
                              len(routed.tokens))
        return routed

    def _recent(self, key: str) -> tuple[list[Placement], bool] | None:
        """This prompt's lookup answer and whether it is stale: within lookup_cache_ttl it
        is fresh, for lookup_stale_ttl more it still routes while a renewal runs."""
        if self.kv.lookup_cache_ttl <= 0:
            return None
        with self._recent_lock:
            entry = self.recent_lookups.get(key)
            if entry is None:
                return None
            now = time.monotonic()
            if now < entry[0]:
                return list(entry[1]), False
            if now < entry[0] + self.kv.lookup_stale_ttl:
                return list(entry[1]), True
            del self.recent_lookups[key]
            return None

    async def _ask(self, key: str, probe: Tokens, timeout: float) -> list[Placement]:
        """Where LMCache holds this prompt. Requests for one prompt arriving while its lookup
        is in flight wait for that answer instead of asking again (unless the TTL is 0)."""
        if self.kv.lookup_cache_ttl <= 0:  # ask for every request, as configured
            return await self._lookup(probe, timeout)
        loop = asyncio.get_running_loop()
        pending = self._asking.get(key)
        if pending is not None and pending.get_loop() is loop:
            self.counters.inc("lookup.joined")
            try:
                return await asyncio.wait_for(asyncio.shield(pending), timeout)
            except TimeoutError:  # this request's budget ran out; the lookup goes on
                raise CallError("lmcache /lookup: timed out", retryable=True) from None
        # the first asker awaits the call itself (no task, no extra loop turn) and hands
        # the answer to whoever joined meanwhile
        shared: asyncio.Future[list[Placement]] = loop.create_future()
        self._asking[key] = shared
        try:
            placements = await self._lookup(probe, timeout)
        except BaseException as exc:  # joiners get an error they fall back on, never a cancel
            shared.set_exception(exc if isinstance(exc, Exception) else CallError(
                "lmcache /lookup: cancelled", retryable=True))
            shared.exception()  # retrieved: nothing to report when it is collected
            raise
        else:
            shared.set_result(placements)
            return placements
        finally:
            if self._asking.get(key) is shared:
                del self._asking[key]

    async def _lookup(self, probe: Tokens, timeout: float) -> list[Placement]:
        return parse_layout(await self.aio_lmcache.post("/lookup", lookup_body(probe), timeout))

    def _revalidate(self, key: str, probe: Tokens) -> None:
        """Renew a stale answer in the background: the request routes on the stale one."""
        if key in self._asking:
            return  # already being renewed (or asked)
        if len(self._asking) >= self.kv.routing_workers:
            self.counters.inc("lookup.renew_skipped")  # bounded: it expires instead
            return
        task = asyncio.get_running_loop().create_task(self._lookup(probe, self.routing_budget))
        self._asking[key] = task  # requests that need an answer meanwhile join it
        task.add_done_callback(partial(self._renewed, key))

    def _renewed(self, key: str, task: asyncio.Future[list[Placement]]) -> None:
        if self._asking.get(key) is task:
            del self._asking[key]
        # exception() also marks a failure as seen: joiners re-raised it already
        if task.cancelled() or task.exception() is not None:
            self.counters.inc("lookup.renew_failed")
            return
        self.counters.inc("lookup.renewed")
        with self._recent_lock:
            self.recent_lookups[key] = (time.monotonic() + self.kv.lookup_cache_ttl,
                                        tuple(task.result()))

    def _overlay(self, key: str, placements: list[Placement], endpoint_id: str,
                 n_tokens: int) -> None:
        """Keep the answer, adding that ``endpoint_id`` will hold the whole prompt once it
        has served it. A reused answer keeps its first expiry: staleness stays bounded."""
        if self.kv.lookup_cache_ttl <= 0:
            return
        held = next((p for p in placements if p.instance_id == endpoint_id), None)
        if held is not None and held.tokens >= n_tokens and key in self.recent_lookups:
            return  # already known: a reused answer routed the same way
        merged = [p for p in placements if p.instance_id != endpoint_id]
        merged.append(Placement(endpoint_id, held.location if held else "",
                                max(n_tokens, held.tokens if held else 0)))
        with self._recent_lock:
            entry = self.recent_lookups.get(key)
            expiry = entry[0] if entry is not None else (
                time.monotonic() + self.kv.lookup_cache_ttl)
            self.recent_lookups[key] = (expiry, tuple(merged))

    def _no_tokens(self, cluster_name: str, routed: Routed) -> Routed:
        routed.decision = self.balancer(cluster_name, routing.BALANCER, "token cache miss")
        return self._remember(routed)

    def route(self, cluster_name: str, body: bytes) -> Routed:
        """Blocking form of ``route_async`` for threads and tests (its own event loop)."""

        async def once() -> Routed:
            try:
                return await self.route_async(cluster_name, body)
            finally:  # the loop ends with this call: so do its lookups and connections
                loop = asyncio.get_running_loop()
                mine = [t for t in list(self._asking.values()) if t.get_loop() is loop]
                await asyncio.gather(*mine, return_exceptions=True)
                self.aio_tokenizer.close_loop()
                self.aio_lmcache.close_loop()

        return asyncio.run(once())

    async def route_async(self, cluster_name: str, body: bytes) -> Routed:
        """Parse and pick an endpoint on the event loop, spending at most the routing budget."""
        loop = asyncio.get_running_loop()
        if len(body) > PARSE_INLINE_MAX:  # a big JSON parse would stall every other flow
            try:
                routed = await asyncio.wait_for(
                    loop.run_in_executor(self.routing_pool, self.prepare, cluster_name, body),
                    self.routing_budget,
                )
            except TimeoutError:
                return Routed(self.balancer(cluster_name, routing.FALLBACK, "parse budget"))
        else:
            routed = self.prepare(cluster_name, body)
        if routed.decision is not None:
            return routed
        end = loop.time() + self.routing_budget
        if (routed.tokens is None and routed.prefix_tokens is None and self.kv.route_on_miss
                and routed.parsed is not None
                and routed.parsed.model in self.local_tokenizers):
            try:
                with self.exporter.tokenize_seconds.time():
                    tokens = await asyncio.wait_for(
                        loop.run_in_executor(self.routing_pool, self._local_tokens,
                                             routed.parsed),
                        max(end - loop.time(), 0.0))
            except TimeoutError as exc:
                self._tokenized(routed, None, exc, cluster_name)
                return routed
            if tokens is not None:
                self._tokenized(routed, tokens, None, cluster_name, "tokenize.local")
        if routed.tokens is None and routed.prefix_tokens is None and self.kv.route_on_miss:
            try:
                with self.exporter.tokenize_seconds.time():
                    answer = await self.aio_tokenizer.post("/tokenize", body, end - loop.time())
                tokens = tokens_from(answer)
            except ROUTING_ERRORS as exc:
                self._tokenized(routed, None, exc, cluster_name)
                return routed
            self._tokenized(routed, tokens, None, cluster_name)
        probe = routed.tokens if routed.tokens is not None else routed.prefix_tokens
        if probe is None:
            return self._no_tokens(cluster_name, routed)
        if routed.tokens is not None:
            recent = self._recent(routed.key)
            if recent is not None:
                placements, stale = recent
                if stale:
                    self._revalidate(routed.key, probe)
                return self.finish(cluster_name, routed, placements, None,
                                   "lookup.stale" if stale else "lookup.reused")
        try:
            with self.exporter.lookup_seconds.time():
                placements = await self._ask(routed.key, probe, end - loop.time())
        except ROUTING_ERRORS as exc:
            return self.finish(cluster_name, routed, None, exc)
        return self.finish(cluster_name, routed, placements, None)

    def _local_tokens(self, parsed: ParsedRequest) -> Tokens | None:
        """In-process tokens for this model, or None (no tokenizer, or only vLLM can say)."""
        tok = self.local_tokenizers.get(parsed.model)
        if tok is None:
            return None
        try:
            return tok.encode_body(parsed.payload) or None
        except Exception as exc:  # the library on odd input: the engine's /tokenize decides
            self.counters.inc("tokenize.local_failed")
            log.debug("[kvcache] local tokenizer failed: %s", type(exc).__name__)
            return None

    # ------------------------------------------------------------ background

    def needs_background(self, routed: Routed) -> bool:
        """Whether cache management could do anything for this request."""
        if routed.parsed is None or self._closed.is_set():
            return False
        cs = self.kv.cache_strategy
        if cs.enable_compression or cs.enable_pinning or cs.enable_eviction:
            return True
        # no action can follow: only tokens to learn, if they are unknown and can be kept
        return routed.tokens is None and self.token_cache.enabled

    def submit_background(self, routed: Routed, cancel: threading.Event) -> bool:
        """Queue cache management for a parsed request; never blocks, drops when full."""
        if not self.needs_background(routed):
            return False
        deadline = Deadline(self.kv.request_timeout, cancel)  # from now: queueing counts
        ok = self.background.submit(lambda: self.manage_cache(routed, cancel, deadline))
        if not ok:
            self.counters.inc("background.dropped")
        return ok

    def manage_cache(self, routed: Routed, cancel: threading.Event,
                     deadline: Deadline | None = None) -> list[strategy.ActionResult]:
        """Tokenize, look up if routing did not, decide, execute; bounded by request_timeout."""
        if deadline is None:
            deadline = Deadline(self.kv.request_timeout, cancel)
        try:
            tokens = routed.tokens
            if tokens is None:
                tokens = self.token_cache.get(routed.key)
            if tokens is None and routed.parsed is not None:
                tokens = self._local_tokens(routed.parsed)
                if tokens is not None:
                    self.token_cache.put(routed.key, tokens)
                    self.counters.inc("tokenize.local")
            if tokens is None:
                tokens = self.tokenizer.tokenize(routed.body, deadline)
                self.token_cache.put(routed.key, tokens)
                self.counters.inc("tokenize.background_ok")
            if routed.placements is None:
                routed.placements = self.lmcache.lookup(tokens, deadline)
                self.counters.inc("lookup.background_ok")
            deadline.check()
            cs = self.kv.cache_strategy
            hot = self.hot.is_hot(routed.key, cs.hot_content_threshold)
            holder = self._holder(routed)
            if self.kv.signals == "process":  # the seed's signals: the gateway's own CPU/RAM
                needs_load = cs.enable_compression or cs.enable_eviction
                decision = strategy.decide(
                    cs, self.load.snapshot() if needs_load else LoadMetrics(), hot)
            else:
                decision = strategy.decide_on_engine(cs, self._busy(holder), hot)
            results: list[strategy.ActionResult] = []
            if self.kv.signals == "engine":
                results += self._free_space(routed.key, holder, tokens, deadline)
            if not decision.any and not results:
                return []
            if decision.any:
                results += strategy.execute(decision, tokens, cs, self.actions, deadline,
                                            strategy.Targets.of(cs, holder))
            for r in results:
                self.counters.inc(f"actions.{r.action}_{r.result}")
            return results
        except Cancelled as exc:
            self.counters.inc("background.cancelled")
            log.debug("[kvcache] cache management for %s stopped: %s", routed.key[:12], exc)
        except Unsupported:
            self.counters.inc("background.unsupported")
        except (CallError, BreakerOpen) as exc:
            self.counters.inc("background.failed")
            log.warning("[kvcache] cache management for %s failed: %s", routed.key[:12], exc)
        return []

    def _free_space(self, key: str, holder: str | None, tokens: Tokens,
                    deadline: Deadline) -> list[strategy.ActionResult]:
        """Remember what each engine holds; when one is nearly full, offload its coldest
        known content (least recently seen, not hot, never what is being served)."""
        cs = self.kv.cache_strategy
        if holder is None:
            return []
        with self._content_lock:
            self.content[key] = (holder, tokens)
            self.content.move_to_end(key)
            while len(self.content) > CONTENT_BOOK_SIZE:
                self.content.popitem(last=False)
        if not cs.enable_eviction or cs.memory_threshold <= 0:
            return []
        stats = self.monitor.fresh(holder, max(3 * self.kv.metrics_interval, 1.0))
        if stats is None or stats.kv_usage < cs.memory_threshold:
            return []
        victim: tuple[str, Tokens] | None = None
        with self._content_lock:
            for other, (ep, toks) in self.content.items():  # oldest first
                if ep == holder and other != key and not self.hot.is_hot(
                        other, cs.hot_content_threshold):
                    victim = (other, toks)
                    break
            if victim is not None:
                del self.content[victim[0]]
        if victim is None:
            return []
        return [strategy.offload(cs.offload_action, holder, victim[1], cs, self.actions,
                                 deadline)]

    def _holder(self, routed: Routed) -> str | None:
        """The instance holding the most of this prompt, else the one serving it."""
        if routed.placements:
            best = max(routed.placements, key=lambda p: p.tokens)
            if best.tokens > 0:
                return best.instance_id
        return routed.decision.endpoint.id if routed.decision is not None else None

    def _busy(self, endpoint_id: str | None) -> bool:
        if endpoint_id is None:
            return False
        stats = self.monitor.fresh(endpoint_id, max(3 * self.kv.metrics_interval, 1.0))
        if stats is None:
            return False
        slots = max(self.monitor.slots.get(endpoint_id, 0.0), float(self.kv.min_batch_slots))
        return strategy.engine_busy(stats.running, stats.waiting, slots,
                                    self.kv.cache_strategy.load_threshold)

    # ------------------------------------------------------------ reporting

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.kv.enabled,
            "token_cache": self.token_cache.snapshot(),
            "hot_keys": len(self.hot),
            "counters": self.counters.grouped(),
            "breakers": {
                "tokenizer": self.tokenizer_breaker.snapshot(),
                "lmcache": self.lmcache_breaker.snapshot(),
                "lmcache_actions": self.actions_breaker.snapshot(),
            },
            "unsupported_actions": {**self.lmcache.unsupported, **self.actions.unsupported},
            "background": self.background.snapshot(),
            "inflight": {n: dict(c.inflight) for n, c in self.clusters.items()},
            "ejected": [ep for ep, ok in self.health.snapshot().items() if not ok],
            "discovery": self.discovery.snapshot() if self.discovery is not None else None,
        }

    def close(self) -> None:
        self._closed.set()
        if self.discovery is not None:
            self.discovery.stop()
        self.monitor.stop()
        self.exporter.close()
        self.background.shutdown()
        self.routing_pool.shutdown(wait=False)  # queued parses finish; no flow sees a cancel
        self.aio_tokenizer.close()
        self.aio_lmcache.close()
        self.pool.clear()
