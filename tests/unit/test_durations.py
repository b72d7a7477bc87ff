"""Go-style duration strings, as Pixiu configs write them."""

from __future__ import annotations

import math

import pytest

from kvgate.config import ConfigError, build_kvcache
from kvgate.config.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100ms", 0.1),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1h2m3.5s", 3723.5),
        (".5s", 0.5),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("10ns", 10e-9),
        ("0", 0.0),
        ("0s", 0.0),
        (" 5s ", 5.0),
        ("+2s", 2.0),
        ("-2s", -2.0),
    ],
)
def test_go_duration_strings(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "seconds"), [(5, 5.0), (0.25, 0.25), (0, 0.0), ("3", 3.0),
                                                ("0.5", 0.5)])
def test_numbers_are_seconds(value: object, seconds: float) -> None:
    got = parse_duration(value)
    assert isinstance(got, float)
    assert got == seconds


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "abc", "5x", "s", "ms", "1.5.s", "5 s", "1m30", "m5", "--5s", True, None, [1],
     {"s": 1}, float("inf"), float("nan")],
)
def test_garbage_is_refused(garbage: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(garbage)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "Infinity", "+nan"])
def test_non_finite_duration_strings_are_refused(text: str) -> None:
    """Regression: strings went through float() unchecked, so 'nan' became a timeout."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_non_finite_duration_in_config_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        build_kvcache({"request_timeout": "nan"})
    assert info.value.field == "request_timeout"


def test_duration_fields_in_config_parse_go_strings() -> None:
    cfg = build_kvcache({
        "request_timeout": "1m30s",
        "lookup_routing_timeout": "100ms",
        "hot_window": "1.5s",
        "token_cache": {"ttl": 7},
        "retry": {"base_backoff": "20ms", "max_backoff": "1s"},
        "circuit_breaker": {"recovery_timeout": "2m"},
    })
    assert cfg.request_timeout == 90.0
    assert cfg.lookup_routing_timeout == pytest.approx(0.1)
    assert cfg.hot_window == 1.5
    assert cfg.token_cache.ttl == 7.0
    assert cfg.retry.base_backoff == pytest.approx(0.02)
    assert cfg.retry.max_backoff == 1.0
    assert cfg.circuit_breaker.recovery_timeout == 120.0


def test_duration_garbage_in_config_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        build_kvcache({"retry": {"base_backoff": "soon"}})
    assert info.value.field == "retry.base_backoff"
    assert "soon" in str(info.value)


@pytest.mark.parametrize("text", ["5m", "2s", "100ms", "1.5s"])
def test_format_duration_round_trips(text: str) -> None:
    seconds = parse_duration(text)
    assert math.isclose(parse_duration(format_duration(seconds)), seconds)
