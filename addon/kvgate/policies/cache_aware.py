"""SGLang-router-style ``cache_aware``: an approximate prefix tree of request text per
endpoint, a cache threshold, and load-balance thresholds. It never asks LMCache.

- Load imbalanced (the most and least loaded healthy endpoints differ by more than
  ``balance_abs_threshold`` requests in flight and by more than ``balance_rel_threshold``
  times): the least loaded endpoint.
- Otherwise the endpoint whose tree matches the longest prefix of the text, when that
  covers more than ``cache_threshold`` of it; else the endpoint with the smallest tree
  (the most room, as far as the gateway knows).
The chosen endpoint's tree then learns the text.

The tree is "approximate" as in SGLang: what the gateway sent where, not what the engine
still holds. Here it is a chain of hashed 64-character pieces of the text (a path in a
trie), with per endpoint at most ``max_tree_chars`` characters, least recently used
pieces dropped first (SGLang trims on a timer; here on insert, so it is always bounded).
Only the first ``MAX_CHARS`` characters of a prompt are matched.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..placement.layout import Placement
from .base import BALANCER, CACHE, Decision, Fleet, OptionError, Policy, Prompt
from .registry import register

PIECE = 64
MAX_CHARS = 256 * 1024


@dataclass
class CacheAwareOptions:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_chars: int = 2 * 1024 * 1024
    """Characters remembered per endpoint (a few bytes of memory each)."""

    def check(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise OptionError("cache_threshold", self.cache_threshold, "must be between 0 and 1")
        if self.balance_abs_threshold < 0:
            raise OptionError("balance_abs_threshold", self.balance_abs_threshold,
                              "must be >= 0")
        if self.balance_rel_threshold < 1.0:
            raise OptionError("balance_rel_threshold", self.balance_rel_threshold,
                              "must be >= 1")
        if self.max_tree_chars < PIECE:
            raise OptionError("max_tree_chars", self.max_tree_chars, f"must be >= {PIECE}")


def _pieces(text: str) -> list[tuple[int, int, int]]:
    """(chars covered so far, piece length, node id) along the text's path in the trie."""
    text = text[:MAX_CHARS]
    out = []
    node = 0
    for start in range(0, len(text), PIECE):
        piece = text[start:start + PIECE]
        node = hash((node, piece))
        out.append((start + len(piece), len(piece), node))
    return out


class ApproximateTree:
    """Which endpoints were sent which text prefixes, bounded per endpoint."""

    def __init__(self, max_chars: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_chars = max_chars
        self._clock = clock
        self._nodes: dict[int, dict[str, float]] = {}  # node -> endpoint -> last sent
        self._held: dict[str, OrderedDict[int, int]] = {}  # endpoint -> node -> chars, LRU
        self.chars: dict[str, int] = {}
        self._lock = threading.Lock()

    def match(self, text: str, eligible: Callable[[str], bool]) -> tuple[int, str | None]:
        """Characters of the longest known prefix and the endpoint sent it most recently."""
        matched, who = 0, None
        with self._lock:
            for covered, _, node in _pieces(text):
                holders = self._nodes.get(node) or {}
                sent = [(t, ep) for ep, t in holders.items() if eligible(ep)]
                if not sent:
                    break
                matched, who = covered, max(sent)[1]
        return matched, who

    def insert(self, text: str, endpoint_id: str) -> None:
        now = self._clock()
        with self._lock:
            held = self._held.setdefault(endpoint_id, OrderedDict())
            for _, size, node in _pieces(text):
                self._nodes.setdefault(node, {})[endpoint_id] = now
                if node in held:
                    held.move_to_end(node)
                else:
                    held[node] = size
                    self.chars[endpoint_id] = self.chars.get(endpoint_id, 0) + size
            while self.chars.get(endpoint_id, 0) > self.max_chars and held:
                node, size = held.popitem(last=False)
                self.chars[endpoint_id] -= size
                holders = self._nodes.get(node)
                if holders is not None:
                    holders.pop(endpoint_id, None)
                    if not holders:
                        del self._nodes[node]

    def __len__(self) -> int:
        return len(self._nodes)


@register("cache_aware", options=CacheAwareOptions)
class CacheAware(Policy):
    needs_placements = False  # it matches text it has seen, not LMCache's answer

    def __init__(self, options: CacheAwareOptions) -> None:
        self.opts = options
        self.tree = ApproximateTree(options.max_tree_chars)

    def choose(self, prompt: Prompt, placements: Sequence[Placement], fleet: Fleet) -> Decision:
        healthy = [ep for ep in fleet.endpoints if fleet.healthy(ep.id)]
        if not healthy:
            return Decision(fleet.round_robin(), BALANCER, 0, "none healthy")
        text = prompt.text
        loads = {ep.id: fleet.inflight.get(ep.id, 0) for ep in healthy}
        most, least = max(loads.values()), min(loads.values())
        o = self.opts
        if most - least > o.balance_abs_threshold and most > least * o.balance_rel_threshold:
            ep = min(healthy, key=lambda e: loads[e.id])
            decision = Decision(ep, BALANCER, 0, f"load imbalance ({most} vs {least} in flight)")
        else:
            matched, who = self.tree.match(text, fleet.healthy)
            rate = matched / min(len(text), MAX_CHARS) if text else 0.0
            by_id = {ep.id: ep for ep in healthy}
            if who is not None and who in by_id and rate > o.cache_threshold:
                decision = Decision(by_id[who], CACHE, 0, f"text prefix match {rate:.2f}")
            else:
                ep = min(healthy, key=lambda e: self.tree.chars.get(e.id, 0))
                decision = Decision(ep, BALANCER, 0,
                                    f"text prefix match {rate:.2f}: smallest tree")
        if text:
            self.tree.insert(text, decision.endpoint.id)
        return decision
