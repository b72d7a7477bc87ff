"""Token ids of prompts seen before: an LRU with a TTL, keyed by the prompt's hash,
bounded by entries and by total tokens, each stored in 4 bytes.

A tuple of Python ints costs about 36 bytes a token: 40 prompts of 780 KiB grew the proxy
by 350 MB (issue 11). ``PackedTokens`` keeps them as packed unsigned 32-bit ids (every
tokenizer's vocabulary fits), and ``max_tokens`` bounds the sum, so the cache's size in
bytes is about 4 x max_tokens plus a few hundred bytes an entry. A prompt with more
tokens than the budget is not cached at all.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from cachetools import TTLCache

Tokens = Sequence[int]


class PackedTokens(Sequence[int]):
    """Immutable token ids, 4 bytes each. Compares equal to any sequence of the same ids."""

    __slots__ = ("_data", "json")

    def __init__(self, data: bytes, json: bytes | None = None) -> None:
        self._data = data
        self.json = json
        """The ids as a JSON list, when the request carried them so (encoded once, off the
        event loop with the body): never kept in a cache, where it would cost 6 bytes a
        token more."""

    @classmethod
    def pack(cls, tokens: Sequence[int]) -> PackedTokens:
        """Packed, without any JSON: what caches keep. OverflowError/TypeError for ids
        that are not 0..2**32-1."""
        if isinstance(tokens, PackedTokens):
            return tokens if tokens.json is None else cls(tokens._data)
        return cls(array("I", tokens).tobytes())

    def _view(self) -> memoryview:
        return memoryview(self._data).cast("I")

    def __len__(self) -> int:
        return len(self._data) >> 2

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> PackedTokens: ...

    def __getitem__(self, i: int | slice) -> int | PackedTokens:
        if isinstance(i, slice):
            return PackedTokens(self._view()[i].tobytes())
        return self._view()[i]

    def __iter__(self) -> Iterator[int]:
        return iter(self._view())

    def tolist(self) -> list[int]:
        return self._view().tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedTokens):
            return self._data == other._data
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and self.tolist() == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._data)

    def __repr__(self) -> str:
        return f"PackedTokens({len(self)} ids)"

    @property
    def nbytes(self) -> int:
        return len(self._data)

    @property
    def data(self) -> bytes:
        """The packed ids (native-endian uint32): what keys and hashes read."""
        return self._data


class TokenCache:
    """LRU with a TTL (the seed evicted at random); counts hits and misses like the seed."""

    def __init__(self, enabled: bool, capacity: int, ttl: float, max_tokens: int = 4_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self.capacity = max(capacity, 1)
        self.max_tokens = max(max_tokens, 1)
        # sized in tokens: cachetools evicts least recently used entries until one fits
        self._cache: TTLCache[str, PackedTokens] = TTLCache(
            maxsize=self.max_tokens, ttl=ttl if ttl > 0 else math.inf, timer=clock,
            getsizeof=len)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.too_large = 0

    def get(self, key: str) -> PackedTokens | None:
        if not self.enabled:
            return None
        with self._lock:
            try:  # one lookup: get() is a membership test and a lookup
                tokens = self._cache[key]
            except KeyError:
                self.misses += 1
                return None
            self.hits += 1
            return tokens

    def peek(self, key: str) -> PackedTokens | None:
        """A probe that does not count as a hit or miss (conversation prefixes)."""
        if not self.enabled:
            return None
        with self._lock:
            return self._cache.get(key)

    def put(self, key: str, tokens: Sequence[int]) -> PackedTokens | None:
        """Keep the tokens (packed); None when they are not kept: disabled, empty, more
        than the whole budget, or ids that do not fit 32 bits."""
        if not self.enabled or not tokens:
            return None
        if len(tokens) > self.max_tokens:
            self.too_large += 1
            return None
        try:
            packed = PackedTokens.pack(tokens)
        except (OverflowError, TypeError):
            return None
        with self._lock:
            self._cache[key] = packed
            while len(self._cache) > self.capacity:
                self._cache.popitem()
        return packed

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)

    @property
    def tokens(self) -> int:
        """Tokens held now (what ``max_tokens`` bounds)."""
        return int(self._cache.currsize)

    def snapshot(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "enabled": self.enabled,
            "size": len(self),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / total, 4) if total else 0.0,
        }
