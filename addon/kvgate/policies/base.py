"""The routing-policy interface: what a policy is given, what it returns, how it is named.

A policy is given the prompt (its text and, when it asked for them, its tokens), where
LMCache holds the prompt's prefix (placements) and a live view of one cluster (endpoints,
health, requests in flight, engine load). It returns a Decision: the endpoint and why.
Policies are pure over those inputs, apart from state of their own (a rotation, a tree),
so each can be tested without a network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..fleet.endpoint import Endpoint
from ..placement.layout import Placement

# why an endpoint was chosen: the x-kvcache-route header and the routes.* counters
CACHE = "cache"  # for what it holds of the prompt
BALANCER = "balancer"  # nothing cached worth it (or not routable): spread the load
FALLBACK = "fallback"  # the lookup could not be made (helper down, slow, breaker open)
DISABLED = "disabled"  # the filter is switched off: round robin


# Decision and Prompt are built on every request: not frozen, since a frozen dataclass's
# __init__ sets each field through object.__setattr__ (3.5x the time). Nobody mutates them.
@dataclass(slots=True)
class Decision:
    endpoint: Endpoint
    reason: str
    matched_tokens: int = 0
    detail: str = ""
    runner_up: str = ""
    """The endpoint ranked next and its figure, e.g. ``vllm-1 (predicted ttft 40 ms)``:
    shown with the flow (the LLM view), never used to route."""


@dataclass(slots=True)
class Prompt:
    """What a policy knows of the request."""

    text: str
    """The prompt's text (chat: message contents joined), for text-matching policies."""
    tokens: Sequence[int] | None
    """Its token ids, when known."""
    probe_tokens: int
    """How many tokens the placements answer for: the prompt's own, or an earlier turn's
    when only those were known (a new turn of a chat)."""


class Fleet(Protocol):
    """One cluster as a policy sees it (``fleet.view.FleetView``)."""

    @property
    def name(self) -> str: ...

    @property
    def endpoints(self) -> Sequence[Endpoint]: ...

    @property
    def inflight(self) -> Mapping[str, int]: ...

    def healthy(self, endpoint_id: str) -> bool: ...

    def up(self, endpoint_id: str) -> bool:
        """``healthy`` for an id known to be one of ``endpoints`` (one call less)."""
        ...

    def round_robin(self) -> Endpoint: ...

    def ahead(self) -> dict[str, float]: ...

    def load(self, endpoint_id: str) -> float: ...


class Policy(ABC):
    """One routing rule. Registered by name (``registry.register``), chosen by ``policy:``."""

    name: ClassVar[str] = ""
    needs_placements: ClassVar[bool] = True
    """Whether the gateway must find the prompt's tokens and ask LMCache before ``choose``;
    without LMCache's answer (helper down) it falls back, not the policy."""

    @abstractmethod
    def choose(self, prompt: Prompt, placements: Sequence[Placement], fleet: Fleet) -> Decision:
        """Pick an endpoint of ``fleet``; an unhealthy one only when none is healthy."""


class OptionError(ValueError):
    """A policy knob out of range; the config names it ``policies.<name>.<field>``."""

    def __init__(self, field_name: str, value: Any, problem: str) -> None:
        super().__init__(f"{field_name}={value!r}: {problem}")
        self.field = field_name
        self.value = value
        self.problem = problem


def matched_by_instance(placements: Sequence[Placement]) -> dict[str, int]:
    """The most tokens each instance holds (an instance may appear more than once)."""
    matched: dict[str, int] = {}
    for p in placements:
        if p.tokens > matched.get(p.instance_id, 0):
            matched[p.instance_id] = p.tokens
    return matched


def no_cache_detail(placements: Sequence[Placement]) -> str:
    return "no cached prefix" if not placements else "holder unknown or unhealthy"
