"""The LMCache controller's HTTP API, as the real controller (lmcache 0.5.6) answers it."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .client import HelperClient, Unsupported
from .deadline import Deadline

log = logging.getLogger("kvgate")


@dataclass(frozen=True)
class Placement:
    instance_id: str
    location: str
    tokens: int


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


class LMCacheClient:
    """Controller calls; an action the controller lacks is switched off after one answer."""

    def __init__(self, client: HelperClient) -> None:
        self.client = client
        self._lock = threading.Lock()
        self.unsupported: dict[str, int] = {}
        self.unsupported_answers = 0

    def supports(self, op: str) -> bool:
        return op not in self.unsupported

    def _call(self, op: str, payload: dict[str, Any], deadline: Deadline) -> Any:
        if op in self.unsupported:
            raise Unsupported(f"lmcache /{op} is switched off", self.unsupported[op])
        try:
            return self.client.post("/" + op, payload, deadline)
        except Unsupported as exc:
            with self._lock:
                self.unsupported_answers += 1
                first = op not in self.unsupported
                self.unsupported.setdefault(op, exc.status or 404)
            if first:
                log.warning(
                    "[kvcache] lmcache controller has no /%s (status %s): action switched off",
                    op, exc.status,
                )
            raise

    def lookup(self, tokens: Sequence[int], deadline: Deadline) -> list[Placement]:
        return parse_layout(self._call("lookup", {"tokens": list(tokens)}, deadline))

    def pin(self, instance_id: str, location: str, tokens: Sequence[int],
            deadline: Deadline) -> Any:
        payload = {"instance_id": instance_id, "location": location, "tokens": list(tokens)}
        return self._call("pin", payload, deadline)

    def compress(self, instance_id: str, location: str, method: str, tokens: Sequence[int],
                 deadline: Deadline) -> Any:
        payload = {"instance_id": instance_id, "location": location, "method": method,
                   "tokens": list(tokens)}
        return self._call("compress", payload, deadline)

    def evict(self, instance_id: str, tokens: Sequence[int], deadline: Deadline) -> Any:
        return self._call("evict", {"instance_id": instance_id, "tokens": list(tokens)}, deadline)

    def move(self, instance_id: str, old_location: str, new_location: str,
             tokens: Sequence[int], deadline: Deadline) -> Any:
        payload = {"old_position": [instance_id, old_location],
                   "new_position": [instance_id, new_location],
                   "tokens": list(tokens), "should_copy": False}
        return self._call("move", payload, deadline)

    def clear(self, instance_id: str, location: str, deadline: Deadline) -> Any:
        return self._call("clear", {"instance_id": instance_id, "location": location}, deadline)
