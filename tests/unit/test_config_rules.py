"""The seed's Validate() rules and ApplyDefaults() defaults, and type checking of fields."""

from __future__ import annotations

from typing import Any

import pytest

from kvgate import config
from kvgate.config import ConfigError, build_kvcache, from_mapping

SEED_RETRY_ATTEMPTS = 3

ENABLED = {"enabled": True, "vllm_endpoint": "http://127.0.0.1:8001",
           "lmcache_endpoint": "http://127.0.0.1:9000"}


def _with(path: str, value: Any) -> dict[str, Any]:
    """ENABLED plus one (possibly dotted) field set."""
    raw: dict[str, Any] = dict(ENABLED)
    *parents, leaf = path.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return raw


# ------------------------------------------------------------ Validate()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("cache_strategy.load_threshold", 1.5),
        ("cache_strategy.load_threshold", -0.1),
        ("cache_strategy.memory_threshold", -0.1),
        ("cache_strategy.memory_threshold", 1.01),
        ("token_cache.max_size", -1),
        ("cache_strategy.hot_content_threshold", -1),
        ("retry.max_attempts", -1),
        ("retry.base_backoff", "-100ms"),
        ("retry.max_backoff", -2),
        ("hot_window", "-5m"),
        ("hot_max_records", -1),
        ("hot_max_keys", -1),
        ("request_timeout", "-1s"),
        ("lookup_routing_timeout", -0.05),
        ("token_cache.ttl", "-1m"),
        ("circuit_breaker.recovery_timeout", "-10s"),
        ("circuit_breaker.failure_threshold", -1),
        ("circuit_breaker.half_open_max_calls", -1),
        ("max_idle_conns", -1),
        ("max_conns_per_host", -1),
        ("max_body_bytes", -1),
        ("routing_workers", 0),
        ("background_workers", 2000),
        ("background_queue", -1),
        ("lookup_cache_ttl", "-1s"),
        ("lookup_stale_ttl", "-500ms"),
    ],
)
def test_validate_refuses_and_names_the_field(path: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build_kvcache(_with(path, value))
    assert info.value.field == path
    assert path in str(info.value)


def test_validate_in_kvgate_shape_names_the_field() -> None:
    doc = {"kvcache": {"vllm_endpoint": "http://a:1", "lmcache_endpoint": "http://b:2",
                       "cache_strategy": {"load_threshold": 1.5}},
           "clusters": [{"name": "c", "endpoints": [
               {"id": "a", "socket_address": {"address": "h", "port": 1}}]}]}
    with pytest.raises(ConfigError) as info:
        from_mapping(doc)
    assert info.value.field.endswith("cache_strategy.load_threshold")
    assert info.value.value == 1.5


@pytest.mark.parametrize(
    ("path", "value", "kept"),
    [
        ("cache_strategy.load_threshold", 1.0, 1.0),
        ("cache_strategy.memory_threshold", 0.0, 0.0),
        ("cache_strategy.memory_threshold", 1, 1.0),
        ("hot_max_keys", 0, 0),
        ("retry.max_attempts", 0, SEED_RETRY_ATTEMPTS),  # 0 is "unset": the default
    ],
)
def test_validate_accepts_boundaries(path: str, value: Any, kept: Any) -> None:
    cfg = build_kvcache(_with(path, value))
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    assert node == kept


@pytest.mark.parametrize("missing", ["vllm_endpoint", "lmcache_endpoint"])
@pytest.mark.parametrize("blank", [None, "", "   "])
def test_endpoints_required_when_enabled(missing: str, blank: Any) -> None:
    raw = dict(ENABLED)
    if blank is None:
        del raw[missing]
    else:
        raw[missing] = blank
    with pytest.raises(ConfigError) as info:
        build_kvcache(raw)
    assert info.value.field == missing
    assert "required when enabled" in info.value.problem


@pytest.mark.parametrize("bad", ["localhost:8001", "ftp://h:1", "http://"])
def test_endpoint_must_be_an_http_url(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_kvcache({**ENABLED, "lmcache_endpoint": bad})
    assert info.value.field == "lmcache_endpoint"


def test_endpoints_not_checked_when_disabled() -> None:
    cfg = build_kvcache({"enabled": False, "vllm_endpoint": "not a url"})
    assert cfg.enabled is False
    assert cfg.vllm_endpoint == "not a url"
    assert cfg.lmcache_endpoint == ""


def test_kvgate_shape_enabled_by_default_requires_endpoints() -> None:
    doc = {"kvcache": {}, "clusters": [{"name": "c", "endpoints": [
        {"id": "a", "socket_address": {"address": "h", "port": 1}}]}]}
    with pytest.raises(ConfigError) as info:
        from_mapping(doc)
    assert info.value.field == "vllm_endpoint"
    doc["kvcache"] = {"enabled": False}
    assert from_mapping(doc).kvcache.enabled is False


# ------------------------------------------------------------ ApplyDefaults()


def _defaults_view(cfg: config.KVCacheConfig) -> dict[str, Any]:
    return {
        "request_timeout": cfg.request_timeout,
        "lookup_routing_timeout": cfg.lookup_routing_timeout,
        "hot_window": cfg.hot_window,
        "hot_max_records": cfg.hot_max_records,
        "retry": (cfg.retry.max_attempts, cfg.retry.base_backoff, cfg.retry.max_backoff),
        "breaker": (cfg.circuit_breaker.failure_threshold, cfg.circuit_breaker.recovery_timeout,
                    cfg.circuit_breaker.half_open_max_calls),
        "compress_method": cfg.cache_strategy.compress_method,
        "max_body_bytes": cfg.max_body_bytes,
    }


SEED_DEFAULTS = {
    "request_timeout": 2.0,
    "lookup_routing_timeout": 0.05,
    "hot_window": 300.0,
    "hot_max_records": 300,
    "retry": (SEED_RETRY_ATTEMPTS, 0.1, 2.0),
    "breaker": (5, 10.0, 2),
    "compress_method": "zstd",
    "max_body_bytes": config.DEFAULT_MAX_BODY_BYTES,
}


def test_defaults_when_fields_are_absent() -> None:
    assert _defaults_view(build_kvcache({})) == SEED_DEFAULTS
    assert _defaults_view(build_kvcache(dict(ENABLED))) == SEED_DEFAULTS


def test_defaults_when_fields_are_zero_or_empty() -> None:
    cfg = build_kvcache({
        **ENABLED,
        "request_timeout": 0,
        "lookup_routing_timeout": "0s",
        "hot_window": "0",
        "hot_max_records": 0,
        "max_body_bytes": 0,
        "retry": {"max_attempts": 0, "base_backoff": 0, "max_backoff": "0ms"},
        "circuit_breaker": {"failure_threshold": 0, "recovery_timeout": 0,
                            "half_open_max_calls": 0},
        "cache_strategy": {"compress_method": ""},
    })
    assert _defaults_view(cfg) == SEED_DEFAULTS


def test_null_compress_method_takes_the_default() -> None:
    assert build_kvcache({"cache_strategy": {"compress_method": None}}).cache_strategy \
        .compress_method == SEED_DEFAULTS["compress_method"]


def test_set_values_are_kept_over_defaults() -> None:
    cfg = build_kvcache({
        **ENABLED,
        "request_timeout": "7s",
        "hot_max_records": 12,
        "retry": {"max_attempts": 9},
        "circuit_breaker": {"half_open_max_calls": 4},
        "cache_strategy": {"compress_method": "lz4"},
    })
    assert cfg.request_timeout == 7.0
    assert cfg.hot_max_records == 12
    assert cfg.retry.max_attempts == 9
    assert cfg.retry.base_backoff == SEED_DEFAULTS["retry"][1]
    assert cfg.circuit_breaker.half_open_max_calls == 4
    assert cfg.cache_strategy.compress_method == "lz4"


def test_endpoints_are_trimmed() -> None:
    cfg = build_kvcache({**ENABLED, "vllm_endpoint": "  http://h:1/  "})
    assert cfg.vllm_endpoint == "http://h:1"


def test_unbounded_zero_caps_are_bounded() -> None:
    cfg = build_kvcache({"token_cache": {"max_size": 0}, "hot_max_keys": 0})
    assert cfg.token_cache.capacity == config.DEFAULT_TOKEN_CACHE_CAP
    assert cfg.hot_keys_cap == config.DEFAULT_HOT_KEYS_CAP
    cfg = build_kvcache({"token_cache": {"max_size": 5}, "hot_max_keys": 9})
    assert (cfg.token_cache.capacity, cfg.hot_keys_cap) == (5, 9)


# ------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("hot_max_records", "300", "integer"),
        ("hot_max_records", 3.5, "integer"),
        ("hot_max_records", True, "integer"),
        ("token_cache.max_size", "big", "integer"),
        ("retry.max_attempts", None, "integer"),
        ("enabled", "yes", "true or false"),
        ("route_on_miss", 1, "true or false"),
        ("cache_strategy.memory_threshold", "high", "number"),
        ("cache_strategy.load_threshold", False, "number"),
        ("default_model", 5, "string"),
        ("virtual_hosts", "a.example", "list of strings"),
        ("token_cache", 5, "mapping"),
        ("cache_strategy", ["x"], "mapping"),
    ],
)
def test_wrong_types_are_named(path: str, value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_kvcache(_with(path, value), "kvcache.")
    assert info.value.field == f"kvcache.{path}"
    assert problem in info.value.problem


def test_lookup_answer_windows_take_durations() -> None:
    cfg = build_kvcache({"lookup_cache_ttl": "250ms", "lookup_stale_ttl": "2s"})
    assert (cfg.lookup_cache_ttl, cfg.lookup_stale_ttl) == (0.25, 2.0)
    assert build_kvcache({}).lookup_stale_ttl == 1.0


def test_int_is_accepted_where_a_float_is_expected() -> None:
    cfg = build_kvcache({"cache_strategy": {"memory_threshold": 1, "load_threshold": 0}})
    assert isinstance(cfg.cache_strategy.memory_threshold, float)
    assert cfg.cache_strategy.memory_threshold == 1.0
