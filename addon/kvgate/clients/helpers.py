"""The helper services as the gateway reaches them: vLLM's /tokenize and LMCache's
controller, on the event loop for the request path and blocking for the background.

Each helper has a circuit breaker. LMCache's actions (pin, compress, offload) have their
own, so a controller refusing an action never stops the lookups routing depends on.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import KVCacheConfig
from ..placement.layout import Placement
from .aio_http import AsyncHelper
from .breaker import BreakerOpen, CircuitBreaker
from .deadline import Cancelled
from .http import CallError, HelperClient, make_pool
from .lmcache import LMCacheClient, lookup_async
from .tokenizer import Tokenizer

# what a helper call on the request path can end in; routing falls back on any of them
HELPER_ERRORS = (CallError, BreakerOpen, Cancelled, TimeoutError)


class Helpers:
    def __init__(self, kv: KVCacheConfig) -> None:
        cb = kv.circuit_breaker

        def breaker(name: str) -> CircuitBreaker:
            return CircuitBreaker(name, cb.failure_threshold, cb.recovery_timeout,
                                  cb.half_open_max_calls)

        self.tokenizer_breaker = breaker("tokenizer")
        self.lmcache_breaker = breaker("lmcache")
        self.actions_breaker = breaker("lmcache-actions")
        # the request path: on the event loop, one call within the routing budget
        self.aio_tokenizer = AsyncHelper("tokenizer", kv.vllm_endpoint, self.tokenizer_breaker,
                                         kv.routing_workers)
        self.aio_lmcache = AsyncHelper("lmcache", kv.lmcache_endpoint, self.lmcache_breaker,
                                       kv.routing_workers)
        # the background: blocking calls on pools sized by the config, LMCache's retried
        self.pool = make_pool(kv)
        self.tokenizer = Tokenizer(HelperClient("tokenizer", kv.vllm_endpoint, self.pool,
                                                self.tokenizer_breaker))
        self.lmcache = LMCacheClient(HelperClient("lmcache", kv.lmcache_endpoint, self.pool,
                                                  self.lmcache_breaker, kv.retry))
        self.actions = LMCacheClient(HelperClient("lmcache", kv.lmcache_endpoint, self.pool,
                                                  self.actions_breaker, kv.retry))
        # discovery's polls of the registry
        self.registry = HelperClient("lmcache", kv.lmcache_endpoint, self.pool,
                                     breaker("lmcache-registry"))

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        return {"tokenizer": self.tokenizer_breaker, "lmcache": self.lmcache_breaker,
                "lmcache_actions": self.actions_breaker}

    async def lookup(self, tokens: Sequence[int], timeout: float) -> list[Placement]:
        return await lookup_async(self.aio_lmcache, tokens, timeout)

    def close_loop(self) -> None:
        """Drop the event-loop connections of the calling loop (a loop that ends)."""
        self.aio_tokenizer.close_loop()
        self.aio_lmcache.close_loop()

    def close(self) -> None:
        self.aio_tokenizer.close()
        self.aio_lmcache.close()
        self.pool.clear()
