"""Cache management: what to ask LMCache for (pure decision) and asking it (execution)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .breaker import BreakerOpen
from .client import CallError, Unsupported
from .config import CacheStrategyConfig
from .deadline import Deadline
from .lmcache import LMCacheClient
from .load import LoadMetrics

log = logging.getLogger("kvgate")


@dataclass(frozen=True)
class Decision:
    compress: bool = False
    pin: bool = False
    evict: bool = False
    reason: str = ""

    @property
    def any(self) -> bool:
        return self.compress or self.pin or self.evict


def decide(cfg: CacheStrategyConfig, load: LoadMetrics, hot: bool) -> Decision:
    """The seed's rules: compress on load, evict on memory, pin on hotness (reason: last rule)."""
    compress = cfg.enable_compression and cfg.load_threshold > 0 and load.cpu >= cfg.load_threshold
    evict = (
        cfg.enable_eviction and cfg.memory_threshold > 0 and load.memory >= cfg.memory_threshold
    )
    pin = cfg.enable_pinning and hot
    reason = ""
    if compress:
        reason = "high_load"
    if evict:
        reason = "memory_threshold"
    if pin:
        reason = "hot_content"
    return Decision(compress=compress, pin=pin, evict=evict, reason=reason)


@dataclass(frozen=True)
class ActionResult:
    action: str
    result: str  # ok | error | unsupported | skipped


def execute(
    decision: Decision,
    tokens: Sequence[int],
    cfg: CacheStrategyConfig,
    lmcache: LMCacheClient,
    deadline: Deadline,
) -> list[ActionResult]:
    """Compress, then pin, then evict; stop at the first error.

    An action the controller lacks is skipped (and stays off) rather than counted as an
    error, so a missing /evict never blocks the pin before it.
    """
    steps = (
        ("compress", decision.compress,
         lambda: lmcache.compress(cfg.compress_instance_id, cfg.compress_location,
                                  cfg.compress_method, tokens, deadline)),
        ("pin", decision.pin,
         lambda: lmcache.pin(cfg.pin_instance_id, cfg.pin_location, tokens, deadline)),
        ("evict", decision.evict,
         lambda: lmcache.evict(cfg.evict_instance_id, tokens, deadline)),
    )
    results: list[ActionResult] = []
    for name, wanted, call in steps:
        if not wanted:
            continue
        if not lmcache.supports(name):
            results.append(ActionResult(name, "unsupported"))
            continue
        try:
            call()
        except Unsupported:
            results.append(ActionResult(name, "unsupported"))
            continue
        except (CallError, BreakerOpen) as exc:
            log.warning("[kvcache] %s failed: %s", name, exc)
            results.append(ActionResult(name, "error"))
            break
        results.append(ActionResult(name, "ok"))
    return results
