"""The least a routing addon can do, for the overhead benchmark's floor row.

Round robin over the engines given in ``KVGATE_FLOOR_ENGINES`` (comma-separated ports on
127.0.0.1): it rewrites the upstream of every request and nothing else. No parsing, no
lookups, no bookkeeping. What it costs against bare mitmdump is what mitmproxy charges
any addon that routes; kvgate's own cost is what it adds on top of this.
"""

from __future__ import annotations

import itertools
import os

from mitmproxy import http


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
