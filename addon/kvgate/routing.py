"""The routing rule: which endpoint serves a request. Pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .config import Endpoint
from .lmcache import Placement

# x-kvcache-route values
CACHE = "cache"  # the endpoint holding the longest cached prefix
BALANCER = "balancer"  # nothing cached anywhere (or not routable): round robin
FALLBACK = "fallback"  # lookup impossible (helper down, slow, breaker open): round robin
DISABLED = "disabled"  # the filter is switched off: round robin


@dataclass(frozen=True)
class RouteDecision:
    endpoint: Endpoint
    reason: str
    matched_tokens: int = 0
    detail: str = ""


def longest_prefix(
    placements: Sequence[Placement],
    endpoints: Sequence[Endpoint],
    healthy: Callable[[str], bool],
    inflight: Mapping[str, int],
) -> tuple[Endpoint, int] | None:
    """The healthy endpoint holding the most matched tokens.

    Ties go to the one with fewer requests in flight, then to config order, so the
    answer never depends on the controller's dict order.
    """
    matched: dict[str, int] = {}
    for p in placements:
        if p.tokens > matched.get(p.instance_id, 0):
            matched[p.instance_id] = p.tokens
    best: tuple[tuple[int, int, int], Endpoint, int] | None = None
    for order, ep in enumerate(endpoints):
        tokens = matched.get(ep.id, 0)
        if tokens <= 0 or not healthy(ep.id):
            continue
        rank = (-tokens, inflight.get(ep.id, 0), order)
        if best is None or rank < best[0]:
            best = (rank, ep, tokens)
    return (best[1], best[2]) if best else None


@dataclass(frozen=True)
class CostModel:
    """Predicted time to first token on one endpoint, in milliseconds.

    uncached prompt tokens are prefilled, cached ones loaded (LMCache's CPU tier, or
    better), and every request ahead of ours costs about one queue slot.
    """

    prefill_ms: float = 0.07
    load_ms: float = 0.007
    queue_ms: float = 40.0

    def ttft(self, prompt_tokens: int, matched: int, ahead: float) -> float:
        matched = min(matched, prompt_tokens)
        return ((prompt_tokens - matched) * self.prefill_ms + matched * self.load_ms
                + ahead * self.queue_ms)


def cheapest(
    prompt_tokens: int,
    placements: Sequence[Placement],
    endpoints: Sequence[Endpoint],
    healthy: Callable[[str], bool],
    ahead: Mapping[str, float],
    model: CostModel,
    inflight: Mapping[str, int] | None = None,
) -> tuple[Endpoint, int, float] | None:
    """The healthy endpoint with the lowest predicted TTFT; ties to the fewest ahead, then
    the fewest in flight, then config order. None when no endpoint is healthy."""
    matched: dict[str, int] = {}
    for p in placements:
        matched[p.instance_id] = max(matched.get(p.instance_id, 0), p.tokens)
    best: tuple[tuple[float, float, int, int], Endpoint, int, float] | None = None
    for order, ep in enumerate(endpoints):
        if not healthy(ep.id):
            continue
        m = matched.get(ep.id, 0)
        cost = model.ttft(prompt_tokens, m, ahead.get(ep.id, 0.0))
        rank = (round(cost, 6), ahead.get(ep.id, 0.0), (inflight or {}).get(ep.id, 0), order)
        if best is None or rank < best[0]:
            best = (rank, ep, m, cost)
    return (best[1], best[2], best[3]) if best else None
