"""Typed readers that copy a YAML mapping onto the config dataclasses, field by field."""

from __future__ import annotations

import logging
from typing import Any

from .durations import parse_duration
from .schema import ConfigError

log = logging.getLogger("kvgate")


def _bool(path: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(path, value, "must be true or false")


def _int(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, value, "must be an integer")
    return value


def _float(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, value, "must be a number")
    return float(value)


def _str(path: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(path, value, "must be a string")
    return value


def _duration(path: str, value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(path, value, str(exc)) from None


def _str_map(path: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()
    ):
        raise ConfigError(path, value, "must map names to non-empty strings")
    return dict(value)


def _str_list(path: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, value, "must be a list of strings")
    return list(value)


_READERS = {
    bool: _bool,
    int: _int,
    float: _float,
    str: _str,
}

_DURATIONS = {
    "health_check_interval",
    "metrics_interval",
    "request_timeout",
    "lookup_routing_timeout",
    "hot_window",
    "ttl",
    "base_backoff",
    "max_backoff",
    "recovery_timeout",
    "interval",
    "lookup_cache_ttl",
    "lookup_stale_ttl",
    "recent_routes_window",
    "base_ejection_time",
    "max_ejection_time",
    "response_headers_timeout",
}


def fill(obj: Any, raw: Any, prefix: str) -> None:
    """Copy a YAML mapping onto a dataclass, type-checking each field."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "config", raw, "must be a mapping")
    known = obj.__dataclass_fields__
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in known:
            log.warning("[kvcache] config: unknown field %s ignored", path)
            continue
        current = getattr(obj, key)
        if hasattr(current, "__dataclass_fields__"):
            fill(current, value, path + ".")
        elif key in _DURATIONS:
            setattr(obj, key, _duration(path, value))
        elif isinstance(current, list):
            setattr(obj, key, _str_list(path, value))
        elif isinstance(current, dict):
            setattr(obj, key, _str_map(path, value))
        else:
            typ = type(current)
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            setattr(obj, key, _READERS[typ](path, value))
