"""Cache management, in the background: fed what routing learnt about a request, it learns
the prompt's tokens, asks where it lives if routing did not, decides (pin hot content,
compress on a busy engine, free space on a full one) and asks LMCache to act.

Bounded: a fixed pool with a fixed queue (dropped and counted when full), each job
within ``request_timeout`` from its submission and stopped when the client goes away.
Nothing here is on the request path, and nothing here reads the routing code.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..clients.breaker import BreakerOpen
from ..clients.deadline import Cancelled, Deadline
from ..clients.helpers import Helpers
from ..clients.http import CallError, Unsupported
from ..config import KVCacheConfig
from ..fleet.engine_metrics import EngineMonitor
from ..observability.counters import Counters
from ..placement.layout import Placement
from ..request.parsing import ParsedRequest
from ..tokens.cache import PackedTokens, TokenCache, Tokens
from . import strategy
from .hotness import HotTracker
from .pool import BoundedPool
from .process_load import LoadMetrics, LoadMonitor

log = logging.getLogger("kvgate")

CONTENT_BOOK_SIZE = 10_000  # prompts remembered per gateway for offload decisions
CONTENT_BOOK_TOKENS = 4_000_000  # and their tokens in all (4 bytes each: 16 MiB)
# a body larger than this is not tokenized in the background: its answer alone (~2 million
# ids as Python ints) would cost ~100 MB while it is read, and routing targets 128k tokens
MAX_BACKGROUND_BODY = 2 * 1024 * 1024


@dataclass(frozen=True)
class Job:
    """What routing learnt about one request, handed over so nothing is done twice."""

    key: str
    parsed: ParsedRequest
    body: bytes
    """The raw body, when its tokens are still unknown (for /tokenize)."""
    tokens: Tokens | None
    placements: Sequence[Placement] | None
    served_by: str | None
    """The endpoint routing sent the request to."""


class CacheManager:
    def __init__(self, kv: KVCacheConfig, token_cache: TokenCache,
                 local_tokens: Callable[[ParsedRequest], Tokens | None], helpers: Helpers,
                 monitor: EngineMonitor, counters: Counters) -> None:
        self.kv = kv
        self.cs = kv.cache_strategy
        self.token_cache = token_cache
        self.local_tokens = local_tokens
        self.tokenizer = helpers.tokenizer
        self.lmcache = helpers.lmcache
        self.actions = helpers.actions  # its own breaker: see clients.helpers
        self.monitor = monitor
        self.counters = counters
        self.hot = HotTracker(kv.hot_window, kv.hot_max_records, kv.hot_keys_cap)
        # hotness is read only to pin and to spare hot content from offloading: with
        # neither (the defaults) nothing is recorded, and 100 000 keys cost nothing
        self.tracks_hotness = (self.cs.hot_content_threshold > 0
                               and (self.cs.enable_pinning or self.cs.enable_eviction))
        self.process_load = LoadMonitor()  # the seed's signals: the gateway's own CPU/RAM
        self.pool = BoundedPool("kvgate-bg", kv.background_workers, kv.background_queue)
        # key -> (engine that holds it, its tokens), least recently seen first
        self.content: OrderedDict[str, tuple[str, Tokens]] = OrderedDict()
        self._content_tokens = 0
        self._content_lock = threading.Lock()
        self._closed = threading.Event()

    def wanted(self, tokens: Tokens | None, body: bytes) -> bool:
        """Whether cache management could do anything for a request (asked before its
        ``Job`` is built: most requests need none)."""
        if self._closed.is_set():
            return False
        cs = self.cs
        if cs.enable_compression or cs.enable_pinning or cs.enable_eviction:
            return True
        # no action can follow: only tokens to learn, if they are unknown and can be kept
        return (tokens is None and self.token_cache.enabled
                and len(body) <= MAX_BACKGROUND_BODY)

    def submit(self, job: Job, cancel: threading.Event) -> bool:
        """Queue the job; never blocks, drops (and counts) when the pool is full."""
        if not self.wanted(job.tokens, job.body):
            return False
        deadline = Deadline(self.kv.request_timeout, cancel)  # from now: queueing counts
        ok = self.pool.submit(lambda: self.manage(job, cancel, deadline),
                              len(job.body) + len(job.parsed.prompt))
        if not ok:
            self.counters.inc("background.dropped")
        return ok

    def manage(self, job: Job, cancel: threading.Event,
               deadline: Deadline | None = None) -> list[strategy.ActionResult]:
        """Tokenize, look up if routing did not, decide, execute; bounded by request_timeout."""
        if deadline is None:
            deadline = Deadline(self.kv.request_timeout, cancel)
        try:
            tokens = self._tokens(job, deadline)
            cs = self.cs
            if not (cs.enable_compression or cs.enable_pinning or cs.enable_eviction):
                return []  # the tokens were all there was to learn
            placements = job.placements
            if placements is None:
                placements = self.lmcache.lookup(tokens, deadline)
                self.counters.inc("lookup.background_ok")
            deadline.check()
            hot = self.hot.is_hot(job.key, cs.hot_content_threshold)
            holder = holder_of(placements, job.served_by)
            if self.kv.signals == "process":  # the seed's signals: the gateway's own CPU/RAM
                needs_load = cs.enable_compression or cs.enable_eviction
                decision = strategy.decide(
                    cs, self.process_load.snapshot() if needs_load else LoadMetrics(), hot)
            else:
                decision = strategy.decide_on_engine(cs, self._busy(holder), hot)
            results: list[strategy.ActionResult] = []
            if self.kv.signals == "engine":
                results += self._free_space(job.key, holder, tokens, deadline)
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
            log.debug("[kvcache] cache management for %s stopped: %s", job.key[:12], exc)
        except Unsupported:
            self.counters.inc("background.unsupported")
        except (CallError, BreakerOpen) as exc:
            self.counters.inc("background.failed")
            log.warning("[kvcache] cache management for %s failed: %s", job.key[:12], exc)
        return []

    def _tokens(self, job: Job, deadline: Deadline) -> Tokens:
        tokens = job.tokens
        if tokens is None:
            tokens = self.token_cache.get(job.key)
        if tokens is None:
            tokens = self.local_tokens(job.parsed)
            if tokens is not None:
                self.token_cache.put(job.key, tokens)
                self.counters.inc("tokenize.local")
        if tokens is None:
            tokens = self.tokenizer.tokenize(job.body, deadline)
            self.token_cache.put(job.key, tokens)
            self.counters.inc("tokenize.background_ok")
        return tokens

    def _free_space(self, key: str, holder: str | None, tokens: Tokens,
                    deadline: Deadline) -> list[strategy.ActionResult]:
        """Remember what each engine holds; when one is nearly full, offload its coldest
        known content (least recently seen, not hot, never what is being served)."""
        cs = self.cs
        if holder is None:
            return []
        try:
            packed: Tokens = PackedTokens.pack(tokens)
        except (OverflowError, TypeError):
            packed = tokens
        with self._content_lock:
            old = self.content.pop(key, None)
            if old is not None:
                self._content_tokens -= len(old[1])
            self.content[key] = (holder, packed)
            self._content_tokens += len(packed)
            while self.content and (len(self.content) > CONTENT_BOOK_SIZE
                                    or self._content_tokens > CONTENT_BOOK_TOKENS):
                self._content_tokens -= len(self.content.popitem(last=False)[1][1])
        if not cs.enable_eviction or cs.memory_threshold <= 0:
            return []
        stats = self.monitor.fresh(holder)
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
                self._content_tokens -= len(victim[1])
        if victim is None:
            return []
        return [strategy.offload(cs.offload_action, holder, victim[1], cs, self.actions,
                                 deadline)]

    def _busy(self, endpoint_id: str | None) -> bool:
        if endpoint_id is None:
            return False
        stats = self.monitor.fresh(endpoint_id)
        if stats is None:
            return False
        slots = self.monitor.batch_slots(endpoint_id, float(self.kv.min_batch_slots))
        return strategy.engine_busy(stats.running, stats.waiting, slots,
                                    self.cs.load_threshold)

    def close(self) -> None:
        self._closed.set()
        self.pool.shutdown()


def holder_of(placements: Sequence[Placement] | None, served_by: str | None) -> str | None:
    """The instance holding the most of this prompt, else the one serving it."""
    if placements:
        best = max(placements, key=lambda p: p.tokens)
        if best.tokens > 0:
            return best.instance_id
    return served_by
