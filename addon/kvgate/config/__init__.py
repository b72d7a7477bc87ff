"""The gateway's configuration: what can be set (``schema``), the rules and the seed's
defaults (``rules``), and reading the three file shapes (``shapes``)."""

from ..fleet.endpoint import Endpoint
from .rules import apply_defaults, build_kvcache, validate
from .schema import (
    DEFAULT_HOT_KEYS_CAP,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TOKEN_CACHE_CAP,
    DEFAULT_TOKEN_CACHE_TOKENS,
    FILTER_NAME,
    CacheStrategyConfig,
    CircuitBreakerConfig,
    ClusterConfig,
    ConfigError,
    DiscoveryConfig,
    GatewayConfig,
    KVCacheConfig,
    OutlierConfig,
    RetryConfig,
    Route,
    TokenCacheConfig,
)
from .shapes import build_clusters, build_routes, from_mapping, load

__all__ = [
    "DEFAULT_HOT_KEYS_CAP", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_TOKEN_CACHE_CAP",
    "DEFAULT_TOKEN_CACHE_TOKENS", "FILTER_NAME",
    "CacheStrategyConfig", "CircuitBreakerConfig", "ClusterConfig", "ConfigError",
    "DiscoveryConfig", "Endpoint", "GatewayConfig", "KVCacheConfig", "OutlierConfig",
    "RetryConfig", "Route",
    "TokenCacheConfig", "apply_defaults", "build_clusters", "build_kvcache", "build_routes",
    "from_mapping", "load", "validate",
]
