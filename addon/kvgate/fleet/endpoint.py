"""One engine's address, as clusters, policies and the config all name it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    id: str
    """The engine's id; with LMCache, its ``instance_id`` (what /lookup answers with)."""
    host: str
    port: int
    scheme: str = "http"

    @property
    def hostport(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"
