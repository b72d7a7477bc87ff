"""Cache management: what to ask LMCache for (pure decision) and asking it (execution)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..clients.breaker import BreakerOpen
from ..clients.deadline import Deadline
from ..clients.http import CallError, Unsupported
from ..clients.lmcache import LMCacheClient
from ..config import CacheStrategyConfig
from .process_load import LoadMetrics

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


def decide_on_engine(cfg: CacheStrategyConfig, engine_busy: bool, hot: bool) -> Decision:
    """kvgate's rules on real signals: compress when the engine holding the content is
    busy, pin hot content. (Freeing an engine's space is not decided per request.)"""
    compress = cfg.enable_compression and engine_busy
    pin = cfg.enable_pinning and hot
    reason = "hot_content" if pin else ("engine_busy" if compress else "")
    return Decision(compress=compress, pin=pin, evict=False, reason=reason)


def engine_busy(running: float, waiting: float, slots: float, load_threshold: float) -> bool:
    """Busy: requests queue, or the share of batch slots in use reaches load_threshold."""
    if waiting > 0:
        return True
    return slots > 0 and load_threshold > 0 and running / slots >= load_threshold


@dataclass(frozen=True)
class Targets:
    """Which instance each action addresses: the configured one, or the content's holder."""

    compress: str
    pin: str
    evict: str

    @classmethod
    def of(cls, cfg: CacheStrategyConfig, holder: str | None) -> Targets:
        return cls(compress=cfg.compress_instance_id or holder or "",
                   pin=cfg.pin_instance_id or holder or "",
                   evict=cfg.evict_instance_id or holder or "")


@dataclass(frozen=True)
class ActionResult:
    action: str
    result: str  # ok | noop (answered, no token touched) | error | unsupported | skipped


def execute(
    decision: Decision,
    tokens: Sequence[int],
    cfg: CacheStrategyConfig,
    lmcache: LMCacheClient,
    deadline: Deadline,
    targets: Targets | None = None,
) -> list[ActionResult]:
    """Compress, then pin, then evict; stop at the first error.

    An action the controller lacks is skipped (and stays off) rather than counted as an
    error, so a missing /evict never blocks the pin before it.
    """
    t = targets or Targets.of(cfg, None)
    steps = (
        ("compress", decision.compress,
         lambda: lmcache.compress(t.compress, cfg.compress_location, cfg.compress_method,
                                  tokens, deadline)),
        ("pin", decision.pin,
         lambda: lmcache.pin(t.pin, cfg.pin_location, tokens, deadline)),
        ("evict", decision.evict,
         lambda: lmcache.evict(t.evict, tokens, deadline)),
    )
    results: list[ActionResult] = []
    for name, wanted, call in steps:
        if not wanted:
            continue
        if not lmcache.supports(name):
            results.append(ActionResult(name, "unsupported"))
            continue
        try:
            answer = call()
        except Unsupported:
            results.append(ActionResult(name, "unsupported"))
            continue
        except (CallError, BreakerOpen) as exc:
            log.warning("[kvcache] %s failed: %s", name, exc)
            results.append(ActionResult(name, "error"))
            break
        results.append(ActionResult(name, "noop" if _did_nothing(answer, tokens) else "ok"))
    return results


def _did_nothing(answer: object, tokens: Sequence[int]) -> bool:
    """A 200 that touched no token: lmcache 0.5.6 answers so for a compression method it
    refuses (zstd) or content nobody holds; not an error, not a success either."""
    return (bool(tokens) and isinstance(answer, dict)
            and answer.get("num_tokens") == 0)


def offload(action: str, instance_id: str, tokens: Sequence[int], cfg: CacheStrategyConfig,
            lmcache: LMCacheClient, deadline: Deadline) -> ActionResult:
    """Free space on an engine by moving, clearing or evicting one piece of cold content."""
    name = f"offload-{action}"
    if not lmcache.supports(action):
        return ActionResult(name, "unsupported")
    try:
        if action == "move":
            lmcache.move(instance_id, cfg.pin_location or "LocalCPUBackend",
                         cfg.offload_location, tokens, deadline)
        elif action == "clear":
            lmcache.clear(instance_id, cfg.pin_location or "LocalCPUBackend", deadline)
        else:
            lmcache.evict(instance_id, tokens, deadline)
    except Unsupported:
        return ActionResult(name, "unsupported")
    except (CallError, BreakerOpen) as exc:
        log.warning("[kvcache] %s on %s failed: %s", name, instance_id, exc)
        return ActionResult(name, "error")
    return ActionResult(name, "ok")
