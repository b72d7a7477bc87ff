"""The configuration's shape: every field, its default and what it means.

Reading files (the three accepted shapes) is ``shapes``; the rules and the seed's
defaults are ``rules``; typed field readers are ``fields``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..fleet.endpoint import Endpoint

FILTER_NAME = "dgp.filter.ai.kvcache"
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# The seed lets 0 mean "unbounded"; kvgate keeps every per-request structure bounded.
DEFAULT_TOKEN_CACHE_CAP = 10_000
DEFAULT_HOT_KEYS_CAP = 100_000
# 16 MiB of token ids (4 bytes each): ~9,000 prompts of 450 tokens, or 30 of 128k
DEFAULT_TOKEN_CACHE_TOKENS = 4_000_000


class ConfigError(ValueError):
    """A config problem, with the field it concerns, shown as one line."""

    def __init__(self, field_name: str, value: object, problem: str) -> None:
        self.field = field_name
        self.value = value
        self.problem = problem
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"[kvcache] config error: {field_name}={shown}: {problem}")


@dataclass
class TokenCacheConfig:
    enabled: bool = False
    max_size: int = 0
    ttl: float = 0.0
    # the sum of cached prompts' tokens (4 bytes each); a prompt above it is not cached;
    # 0 = DEFAULT_TOKEN_CACHE_TOKENS
    max_tokens: int = 0

    @property
    def capacity(self) -> int:
        return self.max_size if self.max_size > 0 else DEFAULT_TOKEN_CACHE_CAP

    @property
    def token_budget(self) -> int:
        return self.max_tokens if self.max_tokens > 0 else DEFAULT_TOKEN_CACHE_TOKENS


@dataclass
class CacheStrategyConfig:
    enable_compression: bool = False
    enable_pinning: bool = False
    enable_eviction: bool = False
    memory_threshold: float = 0.0
    hot_content_threshold: int = 0
    load_threshold: float = 0.0
    pin_instance_id: str = ""
    pin_location: str = ""
    compress_instance_id: str = ""
    compress_location: str = ""
    compress_method: str = "zstd"
    evict_instance_id: str = ""
    # signals: engine -- free space on an engine whose KV usage >= memory_threshold by
    # offloading its coldest known content: move (to offload_location), clear or evict
    offload_action: str = "move"
    offload_location: str = "LocalDiskBackend"


@dataclass
class RetryConfig:
    max_attempts: int = 3
    base_backoff: float = 0.1
    max_backoff: float = 2.0


@dataclass
class CircuitBreakerConfig:
    failure_threshold: int = 5
    recovery_timeout: float = 10.0
    half_open_max_calls: int = 2


@dataclass
class DiscoveryConfig:
    """Engines learnt from the LMCache controller's registered workers."""

    enabled: bool = False
    interval: float = 10.0
    # LMCache registers a worker's ZMQ port, not vLLM's HTTP port: the engines' HTTP port
    engine_port: int = 0
    engine_scheme: str = "http"
    cluster: str = ""  # the cluster discovered engines join; empty: the first one


@dataclass
class OutlierConfig:
    """Passive ejection on answers, as Envoy's outlier detection: an engine whose answers
    fail this many times in a row (5xx, a reset, no response headers in time) is taken out
    of rotation for base_ejection_time x the times it was ejected, at most
    max_ejection_time; active health checks do not bring it back early."""

    consecutive_failures: int = 5  # 0 = off (connect failures still eject)
    base_ejection_time: float = 10.0
    max_ejection_time: float = 300.0


@dataclass
class KVCacheConfig:
    """The filter's own settings: the seed's fields plus kvgate's additions."""

    enabled: bool = False
    vllm_endpoint: str = ""
    lmcache_endpoint: str = ""
    default_model: str = ""
    request_timeout: float = 2.0
    lookup_routing_timeout: float = 0.05
    hot_window: float = 300.0
    hot_max_records: int = 300
    hot_max_keys: int = 0
    max_idle_conns: int = 0
    max_idle_conns_per_host: int = 0
    max_conns_per_host: int = 0
    token_cache: TokenCacheConfig = field(default_factory=TokenCacheConfig)
    cache_strategy: CacheStrategyConfig = field(default_factory=CacheStrategyConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    # kvgate additions
    route_on_miss: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    debug_headers: bool = False
    routing_workers: int = 64
    background_workers: int = 4
    background_queue: int = 256
    virtual_hosts: list[str] = field(default_factory=list)
    # routing model (README "Routing"): predicted TTFT = uncached * prefill_ms +
    # cached * load_ms + completions waited for * queue_ms
    signals: str = "engine"  # engine: /metrics of the holder; process: the seed's own CPU/RAM
    # the routing policy by name (kvgate/policies/): kvgate (predicted TTFT), longest_prefix
    # (the seed's rule), round_robin, loadaware, cache_aware
    policy: str = "kvgate"
    prefill_ms: float = 0.07
    load_ms: float = 0.007
    queue_ms: float = 40.0
    min_batch_slots: int = 4  # sequences an engine runs at once before queueing, at least
    health_check_interval: float = 0.5  # active GET /health per endpoint; 0 = off
    metrics_interval: float = 0.5  # GET /metrics per endpoint (queue, KV usage); 0 = off
    metrics_port: int = 0  # Prometheus /metrics of the gateway itself; 0 = off
    metrics_host: str = "127.0.0.1"
    prefix_index_size: int = 100_000  # remembered prompt prefixes for routing without LMCache
    # a prompt seen again this soon reuses its /lookup answer (plus where the gateway sent
    # it since); 0 = ask LMCache for every request
    lookup_cache_ttl: float = 1.0
    # after lookup_cache_ttl the answer still routes for this long while one lookup renews
    # it in the background (stale-while-revalidate); 0 = wait for a fresh answer
    lookup_stale_ttl: float = 1.0
    # for this long after the gateway sent a prompt, its 256-token chunks count as held by
    # that engine (LMCache learns it only after the prefill, in batches); 0 = off
    recent_routes_window: float = 5.0
    # model name -> tokenizer.json (or the model directory holding it and
    # tokenizer_config.json): first-sight prompts are tokenized in-process, no /tokenize
    tokenizers: dict[str, str] = field(default_factory=dict)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    outlier_detection: OutlierConfig = field(default_factory=OutlierConfig)
    # an engine that has not sent response headers this long after the request went out
    # gets the client a 504 from the gateway and counts as a failure; 0 = wait forever.
    # Long: a non-streamed completion sends its headers only when it is done
    response_headers_timeout: float = 300.0
    # a request whose engine refused the connection (so it never got there) goes to
    # another healthy engine: checked with a connect before mitmproxy's own (see
    # docs/hardening.md); false = the client gets mitmproxy's 502
    retry_refused_connects: bool = True
    # policy name -> its knobs (``policies: {loadaware: {beta: 1.0}}``), filled for every
    # registered policy that has any by rules.policy_options
    policies: dict[str, Any] = field(default_factory=dict)

    @property
    def hot_keys_cap(self) -> int:
        return self.hot_max_keys if self.hot_max_keys > 0 else DEFAULT_HOT_KEYS_CAP


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    endpoints: tuple[Endpoint, ...]
    lb_policy: str = "round_robin"


@dataclass(frozen=True)
class Route:
    prefix: str
    cluster: str


@dataclass
class GatewayConfig:
    kvcache: KVCacheConfig
    clusters: dict[str, ClusterConfig]
    routes: list[Route]
    source: str = ""

    def route_for(self, path: str) -> Route | None:
        """Longest matching prefix wins, as in Pixiu's router."""
        best: Route | None = None
        for route in self.routes:
            if path.startswith(route.prefix) and (
                best is None or len(route.prefix) > len(best.prefix)
            ):
                best = route
        return best
