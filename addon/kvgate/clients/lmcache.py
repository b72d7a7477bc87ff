"""The LMCache controller's HTTP API, as the real controller (lmcache 0.5.6) answers it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from ..placement.layout import Placement, lookup_body, lookup_layout, parse_layout
from .aio_http import AsyncHelper
from .deadline import Deadline
from .http import HelperClient, Unsupported

log = logging.getLogger("kvgate")


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


async def lookup_async(helper: AsyncHelper, tokens: Sequence[int],
                       timeout: float) -> list[Placement]:
    """``POST /lookup`` on the event loop (the request path): one call, one budget."""
    return await helper.post("/lookup", lookup_body(tokens), timeout, lookup_layout)
