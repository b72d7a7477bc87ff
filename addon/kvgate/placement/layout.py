"""Where a prompt's prefix lives: LMCache's ``layout_info``, read without trusting it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Placement:
    instance_id: str
    location: str
    tokens: int
    """Tokens of the prompt's prefix this instance holds."""


def parse_layout(answer: Any) -> list[Placement]:
    """``layout_info`` in the real form ``{id: [location, tokens]}`` or the seed's
    ``{id: {"0": location, "1": tokens}}``; malformed entries are skipped."""
    if not isinstance(answer, dict):
        return []
    layout = answer.get("layout_info")
    if not isinstance(layout, dict):
        return []
    out: list[Placement] = []
    for instance_id, value in layout.items():
        location: Any
        count: Any
        if isinstance(value, list | tuple) and len(value) >= 2:
            location, count = value[0], value[1]
        elif isinstance(value, dict):
            location, count = value.get("0", value.get("location")), value.get("1", value.get(
                "tokens", value.get("token_count")))
        else:
            continue
        if isinstance(count, bool) or not isinstance(count, int | float) or count < 0:
            continue
        out.append(Placement(str(instance_id), str(location or ""), int(count)))
    return out


def lookup_body(tokens: Sequence[int]) -> bytes:
    return json.dumps({"tokens": list(tokens)}, separators=(",", ":")).encode()
