"""The least a routing addon can do, for the overhead benchmark's floor row.

Round robin over the engines given in ``KVGATE_FLOOR_ENGINES`` (comma-separated ports on
127.0.0.1): it rewrites the upstream of every request and nothing else. No parsing, no
lookups, no bookkeeping. What it costs against bare mitmdump is what mitmproxy charges
any addon that routes; kvgate's own cost is what it adds on top of this. Like kvgate's
script it binds every event name it lacks to None: mitmproxy asks a script's module for
each event by name, and a miss costs an AttributeError (0.1 M instructions a request).
"""

from __future__ import annotations

import itertools
import os

import mitmproxy.addons  # noqa: F401  (every event class defined)
from mitmproxy import hooks, http


class FloorRouter:
    def __init__(self) -> None:
        ports = [int(p) for p in os.environ.get("KVGATE_FLOOR_ENGINES", "").split(",") if p]
        self._next = itertools.cycle(ports or [0]).__next__

    def request(self, flow: http.HTTPFlow) -> None:
        port = self._next()
        if port:
            flow.request.port = port
            flow.request.host_header = f"127.0.0.1:{port}"


addons = [FloorRouter()]
for _name in hooks.all_hooks:
    globals().setdefault(_name, None)
