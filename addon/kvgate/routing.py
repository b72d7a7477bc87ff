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
