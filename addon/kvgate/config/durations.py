"""Go-style duration strings ("100ms", "1m30s"), because Pixiu configs are written in them."""

from __future__ import annotations

import math
import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: object) -> float:
    """Seconds from a Go duration string or a plain number of seconds.

    Raises ValueError with a message fit to show a user.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '100ms' or a number of seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("duration must be finite")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '100ms' or a number of seconds")
    text = value.strip()
    if not text:
        raise ValueError("empty duration")
    sign = 1.0
    if text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ValueError("duration must be finite")
        return sign * number
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration {value!r} (use e.g. 100ms, 5s, 10m)")
    return sign * total


def format_duration(seconds: float) -> str:
    """Short human form used in README tables and log lines."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"
