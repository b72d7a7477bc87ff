"""Reading a config file: the seed's shape, a full Pixiu config, or kvgate's own.

Accepted shapes (see docs/configuration.md):
  (a) the seed's own file: top-level ``http_filters`` + ``clusters``;
  (b) a full Pixiu config: ``static_resources`` (or top-level) ``listeners`` ->
      ``filter_chains`` -> ``filters`` -> ``config.http_filters`` / ``route_config``;
  (c) kvgate's own: ``kvcache`` + ``clusters`` (+ optional ``routes``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import yaml

from ..fleet.endpoint import Endpoint
from .rules import build_kvcache
from .schema import FILTER_NAME, ClusterConfig, ConfigError, GatewayConfig, Route

log = logging.getLogger("kvgate")


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
