"""Where the gateway sent each prompt, remembered until LMCache knows it.

The engine a request goes to will hold its prefix, but LMCache learns that only once the
engine has prefilled it and reported. Three memories bridge the gap, each for its reader:
the prefix index (text pieces, for routing when LMCache cannot be asked), the recent routes
(token chunks, for a fresh ``/lookup`` answer that does not know yet) and the overlay on
the prompt's own lookup answer (for its repeats).
"""

from __future__ import annotations

from collections.abc import Sequence

from .layout import Placement
from .lookup_cache import LookupCache
from .prefix_index import PrefixIndex
from .recent_routes import RecentRoutes, merge


class SentRoutes:
    def __init__(self, index_size: int, recent_window: float, lookups: LookupCache) -> None:
        self.prefix_index = PrefixIndex(index_size)
        self.recent = RecentRoutes(recent_window)
        self.lookups = lookups

    def note(self, key: str, key_text: str, endpoint_id: str, probe: Sequence[int] | None,
             tokens: Sequence[int] | None, placements: list[Placement] | None) -> None:
        # the recent routes skip a repeat the prefix index saw sent the same way just now
        if self.prefix_index.note(key, key_text, endpoint_id) and probe is not None:
            self.recent.note(probe, endpoint_id)
        if tokens is not None and placements is not None:
            self.lookups.overlay(key, placements, endpoint_id, len(tokens))

    def add_recent(self, probe: Sequence[int],
                   placements: list[Placement]) -> tuple[list[Placement], bool]:
        """A fresh answer with what the gateway sent since (and copies LMCache does not
        name: it names one engine a chunk); True if that added anything."""
        held = self.recent.held(probe, max((p.tokens for p in placements), default=0))
        return (merge(placements, held), True) if held else (placements, False)

    def forget(self, endpoint_id: str) -> None:
        """The endpoint left rotation: it may come back empty, so claim nothing for it."""
        self.recent.forget(endpoint_id)

    def last_holder(self, key_text: str) -> str | None:
        """The endpoint that last served this text's longest known prefix."""
        known = self.prefix_index.best(key_text)
        return known[0] if known is not None else None
