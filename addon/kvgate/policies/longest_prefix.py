"""The seed's rule: the healthy endpoint holding the longest cached prefix, else rotation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..fleet.endpoint import Endpoint
from ..placement.layout import Placement
from .base import (
    BALANCER,
    CACHE,
    Decision,
    Fleet,
    Policy,
    Prompt,
    matched_by_instance,
    no_cache_detail,
)
from .registry import register


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
    matched = matched_by_instance(placements)
    best: tuple[tuple[int, int, int], Endpoint, int] | None = None
    for order, ep in enumerate(endpoints):
        tokens = matched.get(ep.id, 0)
        if tokens <= 0 or not healthy(ep.id):
            continue
        rank = (-tokens, inflight.get(ep.id, 0), order)
        if best is None or rank < best[0]:
            best = (rank, ep, tokens)
    return (best[1], best[2]) if best else None


@register("longest_prefix")
class LongestPrefix(Policy):
    def __init__(self, options: Any = None) -> None:
        pass

    def choose(self, prompt: Prompt, placements: Sequence[Placement], fleet: Fleet) -> Decision:
        best = longest_prefix(placements, fleet.endpoints, fleet.healthy, fleet.inflight)
        if best is None:
            return Decision(fleet.round_robin(), BALANCER, 0, no_cache_detail(placements))
        return Decision(best[0], CACHE, best[1])
