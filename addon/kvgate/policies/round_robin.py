"""Round robin: every healthy endpoint in turn, whatever it holds. The baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..placement.layout import Placement
from .base import BALANCER, Decision, Fleet, Policy, Prompt
from .registry import register


@register("round_robin")
class RoundRobin(Policy):
    # it reads nothing of the prompt: no tokenizing, no lookup on its request path
    needs_placements = False

    def __init__(self, options: Any = None) -> None:
        pass

    def choose(self, prompt: Prompt, placements: Sequence[Placement], fleet: Fleet) -> Decision:
        return Decision(fleet.round_robin(), BALANCER, 0, "policy")
