"""One engine's address, as clusters, policies and the config all name it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Endpoint:
    id: str
    """The engine's id; with LMCache, its ``instance_id`` (what /lookup answers with)."""
    host: str
    port: int
    scheme: str = "http"
    # made once: every routed request reads them
    hostport: str = field(init=False, compare=False, repr=False)
    """``host[:port]`` as a Host header names it (no port when it is the scheme's)."""
    scheme_bytes: bytes = field(init=False, compare=False, repr=False)
    url: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        default = 443 if self.scheme == "https" else 80
        hostport = self.host if self.port == default else f"{self.host}:{self.port}"
        object.__setattr__(self, "hostport", hostport)
        object.__setattr__(self, "scheme_bytes", self.scheme.encode("ascii", "replace"))
        object.__setattr__(self, "url", f"{self.scheme}://{self.host}:{self.port}")
