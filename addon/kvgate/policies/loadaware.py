"""The vLLM production-stack router's ``loadaware`` score: hit ratio minus relative load.

score(e) = matched(e) / prompt tokens - beta x load(e) / the busiest healthy endpoint's load

``matched`` is what LMCache says ``e`` holds of the prompt; ``load`` is what the engine has
(requests the gateway has in flight there, or the engine's running + waiting from
/metrics, whichever is more). The highest score wins; among equal scores with nothing
cached, the rotation decides, so an idle fleet is still spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..placement.layout import Placement
from .base import (
    BALANCER,
    CACHE,
    Decision,
    Fleet,
    OptionError,
    Policy,
    Prompt,
    matched_by_instance,
    no_cache_detail,
)
from .registry import register


@dataclass
class LoadAwareOptions:
    beta: float = 1.0
    """Weight of load against cache hits: 0 routes on hits alone."""

    def check(self) -> None:
        if self.beta < 0:
            raise OptionError("beta", self.beta, "must be >= 0")


@register("loadaware", options=LoadAwareOptions)
class LoadAware(Policy):
    def __init__(self, options: LoadAwareOptions) -> None:
        self.beta = options.beta

    def choose(self, prompt: Prompt, placements: Sequence[Placement], fleet: Fleet) -> Decision:
        healthy = [ep for ep in fleet.endpoints if fleet.healthy(ep.id)]
        if not healthy:
            return Decision(fleet.round_robin(), BALANCER, 0, "none healthy")
        n = prompt.probe_tokens
        matched = matched_by_instance(placements)
        loads = [fleet.load(ep.id) for ep in healthy]
        peak = max(loads)
        scored = []
        for order, (ep, load) in enumerate(zip(healthy, loads, strict=True)):
            m = min(matched.get(ep.id, 0), n)
            hit = m / n if n > 0 else 0.0
            rel = load / peak if peak > 0 else 0.0
            score = round(hit - self.beta * rel, 9)
            scored.append(((-score, -m, rel, order), ep, m, hit, rel))
        rank, ep, m, hit, rel = min(scored, key=lambda s: s[0])
        detail = f"score {-rank[0]:.2f} (hit {hit:.2f}, load {rel:.2f})"
        if m > 0:
            return Decision(ep, CACHE, m, detail)
        rr = fleet.round_robin()  # a tie with nothing cached: take turns
        if any(s[1].id == rr.id and s[0][:3] == rank[:3] for s in scored):
            ep = rr
        return Decision(ep, BALANCER, 0, f"{no_cache_detail(placements)}; {detail}")
