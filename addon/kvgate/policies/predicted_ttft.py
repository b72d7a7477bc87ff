"""kvgate's rule (``policy: kvgate``): the endpoint with the lowest predicted time to first
token, counting what it holds of the prompt and the queue a request would wait in."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..fleet.endpoint import Endpoint
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
class CostModel:
    """Predicted time to first token on one endpoint, in milliseconds.

    uncached prompt tokens are prefilled, cached ones loaded (LMCache's CPU tier, or
    better), and every completion ours waits for before it gets a batch slot costs about
    one queue slot (``FleetView.ahead``).
    """

    prefill_ms: float = 0.07
    load_ms: float = 0.007
    queue_ms: float = 40.0
    replicate: float = 1.0
    """What a second copy of a prefix costs the cluster later, as a share of its prefill:
    the copy evicts other content (its next request misses). Charged to an engine for
    what it lacks of the prefix that another healthy engine holds."""
    # documented at the top of ``kvcache:`` before policies had knobs of their own; still
    # read from there unless ``policies: {kvgate: {...}}`` sets them
    LEGACY: ClassVar[tuple[str, ...]] = ("prefill_ms", "load_ms", "queue_ms")

    def check(self) -> None:
        for name in ("prefill_ms", "load_ms", "queue_ms", "replicate"):
            if getattr(self, name) < 0:
                raise OptionError(name, getattr(self, name), "must be >= 0")

    def ttft(self, prompt_tokens: int, matched: int, ahead: float) -> float:
        matched = min(matched, prompt_tokens)
        return ((prompt_tokens - matched) * self.prefill_ms + matched * self.load_ms
                + ahead * self.queue_ms)

    def cost(self, prompt_tokens: int, matched: int, ahead: float, held: int) -> float:
        """What routing minimises: the predicted TTFT, plus the price of copying a prefix
        that another engine already holds (``held`` tokens of it). The definition; the
        ranking has the same sums inline (``_ranked``)."""
        cost = self.ttft(prompt_tokens, matched, ahead)
        matched = min(matched, prompt_tokens)
        if self.replicate and held > matched:
            cost += self.replicate * (min(held, prompt_tokens) - matched) * self.prefill_ms
        return cost


def cheapest(*args: object, **kw: object) -> tuple[Endpoint, int, float] | None:
    """The healthy endpoint with the lowest predicted TTFT (``ranked``'s first), or None
    when no endpoint is healthy."""
    best = ranked(*args, **kw)  # type: ignore[arg-type]
    return best[0] if best else None


def ranked(
    prompt_tokens: int,
    placements: Sequence[Placement],
    endpoints: Sequence[Endpoint],
    healthy: Callable[[str], bool],
    ahead: Mapping[str, float],
    model: CostModel,
    inflight: Mapping[str, int] | None = None,
) -> list[tuple[Endpoint, int, float]]:
    """The cheapest healthy endpoint and the runner-up (for the flow's "why"), in one
    pass: ties to the fewest ahead, then the fewest in flight, then config order."""
    return [(r[1], r[2], r[3]) for r in
            _ranked(prompt_tokens, placements, endpoints, healthy, ahead, model, inflight)]


# one ranked endpoint: (tie-break key, endpoint, matched tokens, cost, predicted ttft); a
# plain tuple, as a NamedTuple's constructor is a Python call per endpoint per request
_Rank = tuple[tuple[int, float, int, int], Endpoint, int, float, float]


def _ranked(prompt_tokens: int, placements: Sequence[Placement],
            endpoints: Sequence[Endpoint], healthy: Callable[[str], bool],
            ahead: Mapping[str, float], model: CostModel,
            inflight: Mapping[str, int] | None) -> list[_Rank]:
    """``ranked`` with each one's predicted TTFT. ``CostModel.cost`` and ``ttft`` inline:
    this runs per endpoint per request (tests hold the two to the same figures)."""
    matched = matched_by_instance(placements)
    up: list[Endpoint] = []
    held = 0  # the most of the prompt a healthy engine holds (held_anywhere, inline)
    for ep in endpoints:
        if healthy(ep.id):
            up.append(ep)
            m = matched.get(ep.id, 0)
            if m > held:
                held = m
    n = prompt_tokens
    if held > n:
        held = n
    prefill, load, queue_ms, replicate = (model.prefill_ms, model.load_ms, model.queue_ms,
                                          model.replicate)
    inflight = inflight or {}
    first: _Rank | None = None
    second: _Rank | None = None
    for order, ep in enumerate(up):
        eid = ep.id
        m = matched.get(eid, 0)
        mc = m if m <= n else n  # (the flow still shows what the engine said it holds)
        queue = ahead.get(eid, 0.0)
        ttft = (n - mc) * prefill + mc * load + queue * queue_ms
        # what a second copy of the prefix costs later (see CostModel.replicate)
        cost = ttft + replicate * (held - mc) * prefill if replicate and held > mc else ttft
        # costs equal to a nanosecond tie (int(): round(x, 6) goes through float-to-text);
        # ``order`` is unique, so keys never tie and tuples compare no further
        rank = ((int(cost * 1e6 + 0.5), queue, inflight.get(eid, 0), order), ep, m, cost, ttft)
        if first is None or rank < first:
            first, second = rank, first
        elif second is None or rank < second:
            second = rank
    if first is None:
        return []
    return [first] if second is None else [first, second]


def held_anywhere(matched: Mapping[str, int], healthy: Callable[[str], bool]) -> int:
    """The most of the prompt any healthy engine holds."""
    return max((m for ep_id, m in matched.items() if healthy(ep_id)), default=0)


@register("kvgate", options=CostModel)
class PredictedTTFT(Policy):
    def __init__(self, options: CostModel) -> None:
        self.model = options

    def choose(self, prompt: Prompt, placements: Sequence[Placement], fleet: Fleet) -> Decision:
        n_tokens = prompt.probe_tokens
        ahead = fleet.ahead()
        best = _ranked(n_tokens, placements, fleet.endpoints, fleet.up, ahead, self.model,
                       fleet.inflight)
        if not best:  # nothing healthy: the rotation still tries someone
            return Decision(fleet.round_robin(), BALANCER, 0, "none healthy")
        _, ep, matched, cost, ttft = best[0]
        if matched > 0:
            runner_up = ""
            if len(best) > 1:
                _, other, _, _, ttft2 = best[1]
                runner_up = f"{other.id} (predicted ttft {round(ttft2)} ms)"
            # whole ms as ints: formatting a float costs a float-to-text conversion
            return Decision(ep, CACHE, matched, f"predicted ttft {round(ttft)} ms", runner_up)
        # Nothing cached anywhere worth it: the least loaded (fewest ahead, then fewest in
        # flight), the rotation breaking ties so that an idle fleet is still spread. In
        # flight counts below the batch slots too: by rotation alone, one engine in four
        # got a new prefix while busy with a hot one, and sixteen one-slot engines queued.
        rr = fleet.round_robin()
        held = held_anywhere(matched_by_instance(placements), fleet.healthy)
        inflight = fleet.inflight
        if (self.model.cost(n_tokens, 0, ahead.get(rr.id, 0.0), held) <= cost + 1e-6
                and inflight.get(rr.id, 0) <= inflight.get(ep.id, 0)):
            ep = rr
        return Decision(ep, BALANCER, 0, no_cache_detail(placements))
