"""Which engine a request is aimed at, by address rather than by spelling.

In regular proxy mode a client may name an engine ``localhost:8001``, ``127.0.0.1:8001``
or ``[::1]:8001``: all the same socket. Endpoints are resolved once (at start, and when
discovery changes them); a request's host is compared as an IP when it is one, and a
name is resolved on the loop's resolver (threads) with a short-lived, bounded cache.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable

from cachetools import TTLCache

from .endpoint import Endpoint

NAMES_CACHED = 1024
NAME_TTL = 60.0


def ip_of(host: str) -> str | None:
    """The canonical text of an IP literal (``[::1]`` and ``::ffff:127.0.0.1`` included)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.compressed


def _resolve(host: str) -> set[str]:
    literal = ip_of(host)
    if literal is not None:
        return {literal}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {ip for info in infos if (ip := ip_of(str(info[4][0]))) is not None}


class EngineAddresses:
    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self._names: TTLCache[str, frozenset[str]] = TTLCache(NAMES_CACHED, NAME_TTL,
                                                              timer=time.monotonic)
        self.update(endpoints)

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """(spelling, port) and (IP, port) of every endpoint; resolves its names (blocking:
        at start or on discovery's thread, never per request)."""
        spelled: set[tuple[str, int]] = set()
        by_ip: set[tuple[str, int]] = set()
        for ep in endpoints:
            spelled.add((ep.host.lower(), ep.port))
            by_ip.update((ip, ep.port) for ip in _resolve(ep.host))
        self.spelled, self.by_ip = spelled, by_ip

    def known(self, host: str, port: int) -> bool | None:
        """True/False when it can tell without resolving a name; None when it must."""
        if (host.lower(), port) in self.spelled:
            return True
        literal = ip_of(host)
        if literal is not None:
            return (literal, port) in self.by_ip
        ips = self._names.get(host.lower())
        if ips is None:
            return None
        return any((ip, port) in self.by_ip for ip in ips)

    async def aimed_at_engine(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is one of the engines, resolving a name if need be."""
        known = self.known(host, port)
        if known is not None:
            return known
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            infos = []
        ips = frozenset(ip for info in infos if (ip := ip_of(str(info[4][0]))) is not None)
        self._names[host.lower()] = ips
        return any((ip, port) in self.by_ip for ip in ips)
