"""The rules a config must meet (the seed's Validate()) and its defaults (ApplyDefaults())."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from .. import policies
from .fields import fill
from .schema import DEFAULT_MAX_BODY_BYTES, ConfigError, KVCacheConfig

log = logging.getLogger("kvgate")


def validate(cfg: KVCacheConfig) -> None:
    """The seed's Validate() rules, checked before defaults so negatives are refused."""
    s = cfg.cache_strategy
    for path, value in (
        ("request_timeout", cfg.request_timeout),
        ("lookup_routing_timeout", cfg.lookup_routing_timeout),
        ("hot_window", cfg.hot_window),
        ("token_cache.ttl", cfg.token_cache.ttl),
        ("retry.base_backoff", cfg.retry.base_backoff),
        ("retry.max_backoff", cfg.retry.max_backoff),
        ("circuit_breaker.recovery_timeout", cfg.circuit_breaker.recovery_timeout),
        ("response_headers_timeout", cfg.response_headers_timeout),
        ("outlier_detection.base_ejection_time", cfg.outlier_detection.base_ejection_time),
        ("outlier_detection.max_ejection_time", cfg.outlier_detection.max_ejection_time),
    ):
        if value < 0:
            raise ConfigError(path, value, "must be >= 0")
    for path, value in (
        ("token_cache.max_size", cfg.token_cache.max_size),
        ("token_cache.max_tokens", cfg.token_cache.max_tokens),
        ("outlier_detection.consecutive_failures", cfg.outlier_detection.consecutive_failures),
        ("cache_strategy.hot_content_threshold", s.hot_content_threshold),
        ("retry.max_attempts", cfg.retry.max_attempts),
        ("hot_max_records", cfg.hot_max_records),
        ("hot_max_keys", cfg.hot_max_keys),
        ("max_idle_conns", cfg.max_idle_conns),
        ("max_idle_conns_per_host", cfg.max_idle_conns_per_host),
        ("max_conns_per_host", cfg.max_conns_per_host),
        ("circuit_breaker.failure_threshold", cfg.circuit_breaker.failure_threshold),
        ("circuit_breaker.half_open_max_calls", cfg.circuit_breaker.half_open_max_calls),
    ):
        if value < 0:
            raise ConfigError(path, value, "must be >= 0")
    for path, value in (
        ("cache_strategy.memory_threshold", s.memory_threshold),
        ("cache_strategy.load_threshold", s.load_threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(path, value, "must be between 0 and 1")
    if cfg.max_body_bytes < 0:
        raise ConfigError("max_body_bytes", cfg.max_body_bytes, "must be >= 0")
    for path, value in (
        ("routing_workers", cfg.routing_workers),
        ("background_workers", cfg.background_workers),
    ):
        if not 1 <= value <= 1024:
            raise ConfigError(path, value, "must be between 1 and 1024")
    if cfg.cache_strategy.offload_action not in ("move", "clear", "evict"):
        raise ConfigError("cache_strategy.offload_action", cfg.cache_strategy.offload_action,
                          "must be move, clear or evict")
    if cfg.signals not in ("engine", "process"):
        raise ConfigError("signals", cfg.signals, "must be engine or process")
    if cfg.policy not in policies.names():
        raise ConfigError("policy", cfg.policy,
                          f"must be one of {', '.join(policies.names())}")
    for path, value in (("prefill_ms", cfg.prefill_ms), ("load_ms", cfg.load_ms),
                        ("queue_ms", cfg.queue_ms),
                        ("health_check_interval", cfg.health_check_interval),
                        ("metrics_interval", cfg.metrics_interval),
                        ("prefix_index_size", cfg.prefix_index_size),
                        ("lookup_cache_ttl", cfg.lookup_cache_ttl),
                        ("lookup_stale_ttl", cfg.lookup_stale_ttl),
                        ("recent_routes_window", cfg.recent_routes_window),
                        ("min_batch_slots", cfg.min_batch_slots)):
        if value < 0:
            raise ConfigError(path, value, "must be >= 0")
    if not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError("metrics_port", cfg.metrics_port, "must be a port 1..65535 (0 = off)")
    d = cfg.discovery
    if d.interval < 0:
        raise ConfigError("discovery.interval", d.interval, "must be >= 0")
    if not 0 <= d.engine_port <= 65535:
        raise ConfigError("discovery.engine_port", d.engine_port, "must be a port 1..65535")
    if d.engine_scheme not in ("http", "https"):
        raise ConfigError("discovery.engine_scheme", d.engine_scheme, "must be http or https")
    od = cfg.outlier_detection
    if od.max_ejection_time < od.base_ejection_time:
        raise ConfigError("outlier_detection.max_ejection_time", od.max_ejection_time,
                          "must be >= outlier_detection.base_ejection_time")
    if cfg.token_cache.max_tokens > 1_000_000_000:
        raise ConfigError("token_cache.max_tokens", cfg.token_cache.max_tokens,
                          "must be at most 1000000000 (4 GB of token ids)")
    if not 0 <= cfg.background_queue <= 1_000_000:
        raise ConfigError("background_queue", cfg.background_queue, "must be 0..1000000")
    if not cfg.enabled:
        return
    for path, value in (
        ("vllm_endpoint", cfg.vllm_endpoint),
        ("lmcache_endpoint", cfg.lmcache_endpoint),
    ):
        if not value.strip():
            raise ConfigError(path, value, "is required when enabled")
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(path, value, "must be an http(s) URL such as http://127.0.0.1:8000")


def apply_defaults(cfg: KVCacheConfig) -> None:
    """The seed's ApplyDefaults(): zero (unset) values take the documented defaults."""
    if cfg.request_timeout <= 0:
        cfg.request_timeout = 2.0
    if cfg.lookup_routing_timeout <= 0:
        cfg.lookup_routing_timeout = 0.05
    if cfg.hot_window <= 0:
        cfg.hot_window = 300.0
    if cfg.hot_max_records <= 0:
        cfg.hot_max_records = 300
    if cfg.hot_max_keys < 0:
        cfg.hot_max_keys = 0
    if cfg.retry.max_attempts <= 0:
        cfg.retry.max_attempts = 3
    if cfg.retry.base_backoff <= 0:
        cfg.retry.base_backoff = 0.1
    if cfg.retry.max_backoff <= 0:
        cfg.retry.max_backoff = 2.0
    if cfg.circuit_breaker.failure_threshold <= 0:
        cfg.circuit_breaker.failure_threshold = 5
    if cfg.circuit_breaker.recovery_timeout <= 0:
        cfg.circuit_breaker.recovery_timeout = 10.0
    if cfg.circuit_breaker.half_open_max_calls <= 0:
        cfg.circuit_breaker.half_open_max_calls = 2
    if not cfg.cache_strategy.compress_method:
        cfg.cache_strategy.compress_method = "zstd"
    if cfg.max_body_bytes == 0:
        cfg.max_body_bytes = DEFAULT_MAX_BODY_BYTES
    cfg.vllm_endpoint = cfg.vllm_endpoint.strip().rstrip("/")
    cfg.lmcache_endpoint = cfg.lmcache_endpoint.strip().rstrip("/")


def policy_options(raw: Any, cfg: KVCacheConfig, path: str) -> dict[str, Any]:
    """Every registered policy's knobs: ``policies: {<name>: {...}}``, checked by the
    policy's own rules; knobs a policy once had at the top of ``kvcache:`` seed them."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, "must map policy names to their settings")
    for name in raw:
        if name not in policies.names():
            log.warning("[kvcache] config: %s.%s is no policy (have: %s): ignored", path, name,
                        ", ".join(policies.names()))
    out: dict[str, Any] = {}
    for name in policies.names():
        spec = policies.spec(name)
        given = raw.get(name)
        if spec.options is None:
            if given not in (None, {}):
                raise ConfigError(f"{path}.{name}", given, "this policy has no settings")
            continue
        opts = spec.options()
        for legacy in getattr(spec.options, "LEGACY", ()):
            if not isinstance(given, dict) or legacy not in given:
                setattr(opts, legacy, getattr(cfg, legacy))
        fill(opts, given, f"{path}.{name}.")
        try:
            opts.check()
        except policies.OptionError as exc:
            raise ConfigError(f"{path}.{name}.{exc.field}", exc.value, exc.problem) from None
        out[name] = opts
    return out


def build_kvcache(raw: Any, prefix: str = "", *, enabled_default: bool = False) -> KVCacheConfig:
    cfg = KVCacheConfig(enabled=enabled_default)
    if enabled_default:
        cfg.token_cache.enabled = True
    raw_policies = None
    if isinstance(raw, dict) and "policies" in raw:
        raw = dict(raw)
        raw_policies = raw.pop("policies")
    fill(cfg, raw, prefix)
    validate(cfg)
    apply_defaults(cfg)
    cfg.policies = policy_options(raw_policies, cfg, prefix + "policies")
    return cfg
