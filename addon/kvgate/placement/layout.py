"""Where a prompt's prefix lives: LMCache's ``layout_info``, read without trusting it."""

from __future__ import annotations

import heapq
import math
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache
from orjson import dumps as _dumps

# A token count no prompt reaches: anything above is a controller's garbage, not a count.
MAX_COUNT = 2**31 - 1
# Instances kept from one answer (the most tokens first): an answer listing a million
# instances must not become a million cached placements.
MAX_PLACEMENTS = 64
MAX_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class Placement:
    instance_id: str
    location: str
    tokens: int
    """Tokens of the prompt's prefix this instance holds."""


class BadLayout(ValueError):
    """The answer has no ``layout_info`` mapping at all: a failed lookup, not 'nothing'."""


def _count(value: Any) -> int | None:
    """A token count, or None for anything that is not one (bool, NaN, inf, 1e400,
    negative, fractional, huge, a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or value > MAX_COUNT or value != int(value):
            return None
        return int(value)
    return None


def _entry(instance_id: Any, value: Any) -> Placement | None:
    if not isinstance(instance_id, str) or not instance_id or len(instance_id) > MAX_ID_CHARS:
        return None
    if isinstance(value, list | tuple) and len(value) >= 2:
        location, count = value[0], value[1]
    elif isinstance(value, dict):
        location = value.get("0", value.get("location"))
        count = value.get("1", value.get("tokens", value.get("token_count")))
    else:
        return None
    if location is None:
        location = ""
    if not isinstance(location, str) or len(location) > MAX_ID_CHARS:
        return None
    n = _count(count)
    # interned: the same few ids and locations come back in every answer that is kept
    return None if n is None else Placement(sys.intern(instance_id), sys.intern(location), n)


def parse_layout(answer: Any) -> list[Placement]:
    """``layout_info`` in the real form ``{id: [location, tokens]}`` or the seed's
    ``{id: {"0": location, "1": tokens}}``; malformed entries are skipped one by one,
    and never more than ``MAX_PLACEMENTS`` are kept. Nothing here raises."""
    if not isinstance(answer, dict):
        return []
    layout = answer.get("layout_info")
    if not isinstance(layout, dict):
        return []
    out = [p for p in (_entry(k, v) for k, v in layout.items()) if p is not None]
    if len(out) > MAX_PLACEMENTS:
        out = heapq.nlargest(MAX_PLACEMENTS, out, key=lambda p: p.tokens)
    return out


def lookup_layout(answer: Any) -> list[Placement]:
    """A /lookup answer as routing reads it: without a ``layout_info`` mapping it is a
    failed lookup (``BadLayout``: counted by the breaker), not an empty one."""
    if not isinstance(answer, dict) or not isinstance(answer.get("layout_info"), dict):
        raise BadLayout("answer has no layout_info")
    return parse_layout(answer)


def lookup_body(tokens: Sequence[int]) -> bytes:
    """The /lookup request body, encoded once per prompt: from the request's own JSON when
    it carried the ids, else from the packed ids, kept (bounded in bytes) for repeats.
    ``orjson`` writes the list ~20x faster than ``json``."""
    known = getattr(tokens, "json", None)
    if known is not None:
        return b'{"tokens":' + known + b"}"
    data = getattr(tokens, "data", None)  # PackedTokens: its bytes hash once, then cached
    if data is not None:
        with _BODIES_LOCK:  # a blocking Gateway.route runs its own loop on a thread
            body = _BODIES.get(data)
        if body is not None:
            return body
    ids = tokens if isinstance(tokens, list) else (
        tokens.tolist() if hasattr(tokens, "tolist") else list(tokens))
    body = b'{"tokens":' + _dumps(ids) + b"}"
    if data is not None and 2 * len(body) <= BODIES_BYTES:
        with _BODIES_LOCK:
            _BODIES[data] = body
    return body


# encoded /lookup bodies of recent prompts, by their packed ids; weighed as twice the body
# (the key, 4 bytes a token, is about 2/3 of it): 4 MiB in all
BODIES_BYTES = 4 * 1024 * 1024
_BODIES: LRUCache[bytes, bytes] = LRUCache(BODIES_BYTES, getsizeof=lambda b: 2 * len(b))
_BODIES_LOCK = threading.Lock()
