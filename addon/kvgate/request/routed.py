"""What a request learnt on its way through the stages: the record the pipeline fills in,
the addon annotates the flow with, and cache management is fed from."""

from __future__ import annotations

from dataclasses import dataclass

from ..placement.layout import Placement
from ..policies.base import Decision
from .parsing import ParsedRequest

Tokens = tuple[int, ...]


@dataclass(slots=True)
class Routed:
    decision: Decision | None
    parsed: ParsedRequest | None = None
    key: str = ""
    """The prompt's hash (model + prompt): cache keys, and what logs show instead of text."""
    tokens: Tokens | None = None
    placements: list[Placement] | None = None
    body: bytes = b""
    """The raw body, kept only while /tokenize may still need it."""
    prefix_tokens: Tokens | None = None
    """Tokens of an earlier turn of this conversation: enough to look up where it lives."""

    @property
    def probe(self) -> Tokens | None:
        """The tokens to ask LMCache about: the prompt's own, else an earlier turn's."""
        return self.tokens if self.tokens is not None else self.prefix_tokens
