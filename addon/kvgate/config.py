"""The gateway's configuration: three accepted file shapes, the seed's defaults and rules.

Accepted shapes (see README "Configuration"):
  (a) the seed's own file: top-level ``http_filters`` + ``clusters``;
  (b) a full Pixiu config: ``static_resources`` (or top-level) ``listeners`` ->
      ``filter_chains`` -> ``filters`` -> ``config.http_filters`` / ``route_config``;
  (c) kvgate's own: ``kvcache`` + ``clusters`` (+ optional ``routes``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from .durations import parse_duration

log = logging.getLogger("kvgate")

FILTER_NAME = "dgp.filter.ai.kvcache"
POLICIES = ("kvgate", "longest_prefix", "round_robin")
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# The seed lets 0 mean "unbounded"; kvgate keeps every per-request structure bounded.
DEFAULT_TOKEN_CACHE_CAP = 10_000
DEFAULT_HOT_KEYS_CAP = 100_000


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

    @property
    def capacity(self) -> int:
        return self.max_size if self.max_size > 0 else DEFAULT_TOKEN_CACHE_CAP


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
    # cached * load_ms + requests ahead * queue_ms
    signals: str = "engine"  # engine: /metrics of the holder; process: the seed's own CPU/RAM
    policy: str = "kvgate"  # kvgate | longest_prefix (the seed's rule) | round_robin
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
    # model name -> tokenizer.json (or the model directory holding it and
    # tokenizer_config.json): first-sight prompts are tokenized in-process, no /tokenize
    tokenizers: dict[str, str] = field(default_factory=dict)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)

    @property
    def hot_keys_cap(self) -> int:
        return self.hot_max_keys if self.hot_max_keys > 0 else DEFAULT_HOT_KEYS_CAP


@dataclass(frozen=True)
class Endpoint:
    id: str
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


# ---------------------------------------------------------------- field readers


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
}


def _fill(obj: Any, raw: Any, prefix: str) -> None:
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
            _fill(current, value, path + ".")
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


# ---------------------------------------------------------------- rules


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
    ):
        if value < 0:
            raise ConfigError(path, value, "must be >= 0")
    for path, value in (
        ("token_cache.max_size", cfg.token_cache.max_size),
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
    if cfg.policy not in POLICIES:
        raise ConfigError("policy", cfg.policy, f"must be one of {', '.join(POLICIES)}")
    for path, value in (("prefill_ms", cfg.prefill_ms), ("load_ms", cfg.load_ms),
                        ("queue_ms", cfg.queue_ms),
                        ("health_check_interval", cfg.health_check_interval),
                        ("metrics_interval", cfg.metrics_interval),
                        ("prefix_index_size", cfg.prefix_index_size),
                        ("lookup_cache_ttl", cfg.lookup_cache_ttl),
                        ("lookup_stale_ttl", cfg.lookup_stale_ttl),
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


def build_kvcache(raw: Any, prefix: str = "", *, enabled_default: bool = False) -> KVCacheConfig:
    cfg = KVCacheConfig(enabled=enabled_default)
    if enabled_default:
        cfg.token_cache.enabled = True
    _fill(cfg, raw, prefix)
    validate(cfg)
    apply_defaults(cfg)
    return cfg


# ---------------------------------------------------------------- clusters and routes


def _endpoint(path: str, raw: Any) -> Endpoint:
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, "must be a mapping with id and socket_address")
    ep_id = raw.get("id")
    if ep_id is None or isinstance(ep_id, bool) or not isinstance(ep_id, str | int):
        raise ConfigError(f"{path}.id", ep_id, "must be a non-empty string")
    ep_id = str(ep_id)
    if not ep_id:
        raise ConfigError(f"{path}.id", ep_id, "must be a non-empty string")
    sock = raw.get("socket_address")
    if not isinstance(sock, dict):
        raise ConfigError(f"{path}.socket_address", sock, "must be {address: ..., port: ...}")
    host = sock.get("address")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"{path}.socket_address.address", host, "must be a host name or IP")
    port = sock.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{path}.socket_address.port", port, "must be an integer 1..65535")
    scheme = sock.get("protocol", raw.get("scheme", "http"))
    scheme = str(scheme).lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"{path}.socket_address.protocol", scheme, "must be http or https")
    return Endpoint(id=ep_id, host=host.strip(), port=port, scheme=scheme)


def build_clusters(raw: Any, path: str = "clusters") -> dict[str, ClusterConfig]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, raw, "must be a non-empty list of clusters")
    clusters: dict[str, ClusterConfig] = {}
    for i, item in enumerate(raw):
        cpath = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(cpath, item, "must be a mapping")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{cpath}.name", name, "must be a non-empty string")
        if name in clusters:
            raise ConfigError(f"{cpath}.name", name, "duplicate cluster name")
        raw_eps = item.get("endpoints")
        if not isinstance(raw_eps, list) or not raw_eps:
            raise ConfigError(f"{cpath}.endpoints", raw_eps, "must be a non-empty list")
        endpoints = tuple(_endpoint(f"{cpath}.endpoints[{j}]", e) for j, e in enumerate(raw_eps))
        ids = [e.id for e in endpoints]
        for j, ep_id in enumerate(ids):
            if ids.index(ep_id) != j:
                raise ConfigError(f"{cpath}.endpoints[{j}].id", ep_id, "duplicate endpoint id")
        policy = item.get("lb_policy", "round_robin") or "round_robin"
        if policy not in ("round_robin", "roundrobin", "RoundRobin"):
            log.warning("[kvcache] config: %s.lb_policy %r: only round_robin is built in", cpath,
                        policy)
        clusters[name] = ClusterConfig(name=name, endpoints=endpoints, lb_policy="round_robin")
    return clusters


def build_routes(raw: Any, clusters: dict[str, ClusterConfig], path: str) -> list[Route]:
    if raw is None:
        if len(clusters) == 1:
            return [Route(prefix="/", cluster=next(iter(clusters)))]
        raise ConfigError(path, raw, "routes are required when there is more than one cluster")
    if not isinstance(raw, list):
        raise ConfigError(path, raw, "must be a list of routes")
    routes: list[Route] = []
    for i, item in enumerate(raw):
        rpath = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(rpath, item, "must be a mapping")
        match = item.get("match")
        prefix = match.get("prefix") if isinstance(match, dict) else item.get("prefix")
        target = item.get("route")
        cluster = target.get("cluster") if isinstance(target, dict) else item.get("cluster")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ConfigError(f"{rpath}.prefix", prefix, "must be a path prefix starting with /")
        if cluster is None and len(clusters) == 1:
            cluster = next(iter(clusters))
        if not isinstance(cluster, str) or cluster not in clusters:
            raise ConfigError(f"{rpath}.cluster", cluster,
                              f"names no cluster (have: {', '.join(clusters)})")
        routes.append(Route(prefix=prefix, cluster=cluster))
    if not routes and len(clusters) == 1:
        routes.append(Route(prefix="/", cluster=next(iter(clusters))))
    return routes


# ---------------------------------------------------------------- shapes


def _find_filter(http_filters: Any, path: str) -> tuple[Any, str] | None:
    if not isinstance(http_filters, list):
        return None
    for i, item in enumerate(http_filters):
        if isinstance(item, dict) and item.get("name") == FILTER_NAME:
            return item.get("config") or {}, f"{path}[{i}].config."
    return None


def _iter_pixiu_hcm(root: dict) -> list[tuple[dict, str]]:
    """Every http connection manager config under the listeners, with its path."""
    found: list[tuple[dict, str]] = []
    listeners = root.get("listeners")
    if not isinstance(listeners, list):
        return found
    for li, listener in enumerate(listeners):
        if not isinstance(listener, dict):
            continue
        chains = listener.get("filter_chains")
        chain_list = chains if isinstance(chains, list) else [chains]
        for ci, chain in enumerate(chain_list):
            if not isinstance(chain, dict):
                continue
            filters = chain.get("filters")
            if not isinstance(filters, list):
                continue
            for fi, flt in enumerate(filters):
                if isinstance(flt, dict) and isinstance(flt.get("config"), dict):
                    found.append(
                        (flt["config"], f"listeners[{li}].filter_chains[{ci}].filters[{fi}].config")
                    )
    return found


def _checked(cfg: GatewayConfig) -> GatewayConfig:
    """Rules that need the whole config: tokenizer paths (relative to the config file)
    and the cluster discovered engines join."""
    kv = cfg.kvcache
    base = os.path.dirname(os.path.abspath(cfg.source)) if cfg.source else os.getcwd()
    for model, path in list(kv.tokenizers.items()):
        full = os.path.join(base, os.path.expanduser(path))
        if not os.path.exists(full):
            raise ConfigError(f"tokenizers.{model}", path, "no such file or directory")
        kv.tokenizers[model] = full
    d = kv.discovery
    if d.cluster and d.cluster not in cfg.clusters:
        raise ConfigError("discovery.cluster", d.cluster, "names no configured cluster")
    if d.enabled and not d.cluster:
        d.cluster = next(iter(cfg.clusters))
    return cfg


def from_mapping(doc: Any, source: str = "") -> GatewayConfig:
    return _checked(_from_mapping(doc, source))


def _from_mapping(doc: Any, source: str) -> GatewayConfig:
    if not isinstance(doc, dict):
        raise ConfigError("config", type(doc).__name__, "the file must hold a YAML mapping")
    if "kvcache" in doc:  # kvgate's own shape
        kv = build_kvcache(doc.get("kvcache"), "kvcache.", enabled_default=True)
        clusters = build_clusters(doc.get("clusters"))
        routes = build_routes(doc.get("routes"), clusters, "routes")
        return GatewayConfig(kv, clusters, routes, source)
    if "http_filters" in doc:  # the seed's shape
        hit = _find_filter(doc.get("http_filters"), "http_filters")
        if hit is None:
            raise ConfigError("http_filters", "...", f"holds no {FILTER_NAME} filter")
        kv = build_kvcache(hit[0], hit[1])
        clusters = build_clusters(doc.get("clusters"))
        routes = build_routes(doc.get("routes"), clusters, "routes")
        return GatewayConfig(kv, clusters, routes, source)
    root = doc.get("static_resources", doc)
    if isinstance(root, dict) and "listeners" in root:  # a full Pixiu config
        for hcm, path in _iter_pixiu_hcm(root):
            hit = _find_filter(hcm.get("http_filters"), f"{path}.http_filters")
            if hit is None:
                continue
            kv = build_kvcache(hit[0], hit[1])
            clusters = build_clusters(root.get("clusters"), "clusters")
            route_cfg = hcm.get("route_config")
            raw_routes = route_cfg.get("routes") if isinstance(route_cfg, dict) else None
            routes = build_routes(raw_routes, clusters, f"{path}.route_config.routes")
            return GatewayConfig(kv, clusters, routes, source)
        raise ConfigError("listeners", "...", f"no filter chain holds {FILTER_NAME}")
    raise ConfigError(
        "config", sorted(map(str, doc))[:5],
        "unknown shape: expected 'kvcache', 'http_filters' or Pixiu 'listeners' at the top",
    )


def load(path: str) -> GatewayConfig:
    """Read and check a config file; every problem is a one-line ConfigError."""
    expanded = os.path.expanduser(path)
    try:
        with open(expanded, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError("kvcache_config", path, "no such file") from None
    except OSError as exc:
        raise ConfigError("kvcache_config", path, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("kvcache_config", path, "not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("kvcache_config", path, f"not valid YAML{where}") from None
    return from_mapping(doc, expanded)
