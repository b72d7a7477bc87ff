"""The three accepted config shapes, clusters, endpoints and routes, and load() errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvgate import config
from kvgate.config import ConfigError, Route, from_mapping
from kvgate.config.durations import parse_duration

REPO = Path(__file__).resolve().parents[2]
SEED_FILE = REPO / "configs" / "ai_kvcache_config.yaml"
KVGATE_FILE = REPO / "configs" / "kvgate.yaml"

KV = {
    "enabled": True,
    "vllm_endpoint": "http://127.0.0.1:8001/",
    "lmcache_endpoint": " http://127.0.0.1:9000 ",
    "cache_strategy": {"enable_pinning": True, "hot_content_threshold": 4,
                       "pin_instance_id": "vllm-1"},
}


def _cluster(name: str, *ids: str, port: int = 8001) -> dict[str, Any]:
    return {
        "name": name,
        "endpoints": [
            {"id": ep_id, "socket_address": {"address": "127.0.0.1", "port": port + i}}
            for i, ep_id in enumerate(ids)
        ],
    }


# ------------------------------------------------------------ (a) the seed's file


def test_seed_shape_file_loads() -> None:
    raw = yaml.safe_load(SEED_FILE.read_text())
    filt = raw["http_filters"][0]["config"]
    cfg = config.load(str(SEED_FILE))
    kv = cfg.kvcache

    assert kv.enabled is filt["enabled"]
    assert kv.vllm_endpoint == filt["vllm_endpoint"].rstrip("/")
    assert kv.lmcache_endpoint == filt["lmcache_endpoint"].rstrip("/")
    assert kv.default_model == filt["default_model"]
    assert kv.request_timeout == parse_duration(filt["request_timeout"])
    assert kv.lookup_routing_timeout == parse_duration(filt["lookup_routing_timeout"])
    assert kv.hot_window == parse_duration(filt["hot_window"])
    assert kv.hot_max_records == filt["hot_max_records"]
    assert kv.token_cache.enabled is filt["token_cache"]["enabled"]
    assert kv.token_cache.max_size == filt["token_cache"]["max_size"]
    assert kv.token_cache.ttl == parse_duration(filt["token_cache"]["ttl"])
    for key, value in filt["cache_strategy"].items():
        assert getattr(kv.cache_strategy, key) == value, key

    want_clusters = {c["name"]: [e["id"] for e in c["endpoints"]] for c in raw["clusters"]}
    assert {n: [e.id for e in c.endpoints] for n, c in cfg.clusters.items()} == want_clusters
    assert cfg.source == str(SEED_FILE)
    # one cluster and no routes: everything goes to it
    assert cfg.routes == [Route("/", next(iter(want_clusters)))]


def test_seed_shape_is_disabled_unless_enabled() -> None:
    doc = {"http_filters": [{"name": config.FILTER_NAME, "config": {"default_model": "m"}}],
           "clusters": [_cluster("c", "a")]}
    cfg = from_mapping(doc)
    assert cfg.kvcache.enabled is False
    assert cfg.kvcache.token_cache.enabled is False


def test_seed_shape_without_the_filter_is_refused() -> None:
    doc = {"http_filters": [{"name": "dgp.filter.http.cors", "config": {}}],
           "clusters": [_cluster("c", "a")]}
    with pytest.raises(ConfigError) as info:
        from_mapping(doc)
    assert info.value.field == "http_filters"


def test_seed_shape_field_paths_name_the_filter_position() -> None:
    doc = {"http_filters": [{"name": "other"},
                            {"name": config.FILTER_NAME, "config": {"hot_max_records": "x"}}],
           "clusters": [_cluster("c", "a")]}
    with pytest.raises(ConfigError) as info:
        from_mapping(doc)
    assert info.value.field == "http_filters[1].config.hot_max_records"


# ------------------------------------------------------------ (b) a full Pixiu config


def _pixiu(kv: dict[str, Any], routes: list[dict[str, Any]], clusters: list[dict[str, Any]],
           filter_chains_as_list: bool = True) -> dict[str, Any]:
    chain = {
        "filters": [
            {
                "name": "dgp.filter.httpconnectionmanager",
                "config": {
                    "route_config": {"routes": routes},
                    "http_filters": [
                        {"name": "dgp.filter.http.cors", "config": {}},
                        {"name": config.FILTER_NAME, "config": kv},
                        {"name": "dgp.filter.llm.proxy", "config": {}},
                    ],
                },
            }
        ]
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "net/http",
                    "protocol_type": "HTTP",
                    "address": {"socket_address": {"address": "0.0.0.0", "port": 8888}},
                    "filter_chains": [chain] if filter_chains_as_list else chain,
                }
            ],
            "clusters": clusters,
        }
    }


@pytest.mark.parametrize("as_list", [True, False])
def test_pixiu_full_config(as_list: bool) -> None:
    routes = [
        {"match": {"prefix": "/v1"}, "route": {"cluster": "vllm_cluster"}},
        {"match": {"prefix": "/admin"}, "route": {"cluster": "admin"}},
    ]
    doc = _pixiu(KV, routes, [_cluster("vllm_cluster", "vllm-1", "vllm-2"),
                              _cluster("admin", "adm", port=9100)], as_list)
    cfg = from_mapping(doc, "pixiu.yaml")

    assert cfg.kvcache.enabled is True
    assert cfg.kvcache.vllm_endpoint == "http://127.0.0.1:8001"
    assert cfg.kvcache.lmcache_endpoint == "http://127.0.0.1:9000"
    assert cfg.kvcache.cache_strategy.hot_content_threshold == 4
    assert set(cfg.clusters) == {"vllm_cluster", "admin"}
    assert cfg.routes == [Route("/v1", "vllm_cluster"), Route("/admin", "admin")]
    assert cfg.route_for("/v1/chat/completions").cluster == "vllm_cluster"
    assert cfg.route_for("/admin/x").cluster == "admin"
    assert cfg.route_for("/health") is None


def test_pixiu_longest_prefix_route_wins() -> None:
    routes = [
        {"match": {"prefix": "/"}, "route": {"cluster": "other"}},
        {"match": {"prefix": "/v1/completions"}, "route": {"cluster": "vllm"}},
        {"match": {"prefix": "/v1"}, "route": {"cluster": "other"}},
    ]
    cfg = from_mapping(_pixiu(KV, routes, [_cluster("vllm", "a"), _cluster("other", "b")]))
    assert cfg.route_for("/v1/completions").cluster == "vllm"
    assert cfg.route_for("/v1/models").cluster == "other"
    assert cfg.route_for("/anything").cluster == "other"


def test_pixiu_route_naming_unknown_cluster_is_refused() -> None:
    routes = [{"match": {"prefix": "/v1"}, "route": {"cluster": "nope"}}]
    with pytest.raises(ConfigError) as info:
        from_mapping(_pixiu(KV, routes, [_cluster("vllm", "a"), _cluster("other", "b")]))
    assert info.value.field.endswith("route_config.routes[0].cluster")
    assert info.value.value == "nope"


def test_pixiu_without_kvcache_filter_is_refused() -> None:
    doc = _pixiu(KV, [], [_cluster("vllm", "a")])
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["config"]
    hcm["http_filters"] = [{"name": "dgp.filter.http.cors", "config": {}}]
    with pytest.raises(ConfigError) as info:
        from_mapping(doc)
    assert info.value.field == "listeners"


def test_pixiu_listeners_at_top_level() -> None:
    doc = _pixiu(KV, [{"match": {"prefix": "/"}, "route": {"cluster": "vllm"}}],
                 [_cluster("vllm", "a")])["static_resources"]
    cfg = from_mapping(doc)
    assert cfg.route_for("/v1/completions") == Route("/", "vllm")


# ------------------------------------------------------------ (c) kvgate's own


def test_kvgate_shape_file_loads() -> None:
    raw = yaml.safe_load(KVGATE_FILE.read_text())
    kv_raw = raw["kvcache"]
    cfg = config.load(str(KVGATE_FILE))
    kv = cfg.kvcache
    assert kv.enabled is kv_raw.get("enabled", True)
    assert kv.vllm_endpoint == kv_raw["vllm_endpoint"].rstrip("/")
    assert kv.lmcache_endpoint == kv_raw["lmcache_endpoint"].rstrip("/")
    assert kv.lookup_routing_timeout == parse_duration(kv_raw["lookup_routing_timeout"])
    assert kv.route_on_miss is kv_raw.get("route_on_miss", True)
    assert kv.retry.max_attempts == kv_raw["retry"]["max_attempts"]
    assert kv.retry.base_backoff == parse_duration(kv_raw["retry"]["base_backoff"])
    assert kv.circuit_breaker.failure_threshold == kv_raw["circuit_breaker"]["failure_threshold"]
    for key, value in kv_raw["cache_strategy"].items():
        assert getattr(kv.cache_strategy, key) == value, key
    want = [(r["prefix"], r["cluster"]) for r in raw["routes"]]
    assert [(r.prefix, r.cluster) for r in cfg.routes] == want
    for c in raw["clusters"]:
        got = cfg.clusters[c["name"]].endpoints
        assert [(e.id, e.host, e.port) for e in got] == [
            (e["id"], e["socket_address"]["address"], e["socket_address"]["port"])
            for e in c["endpoints"]
        ]


def test_kvgate_shape_is_enabled_with_token_cache_by_default() -> None:
    cfg = from_mapping({"kvcache": {"vllm_endpoint": "http://a:1", "lmcache_endpoint":
                                    "http://b:2"}, "clusters": [_cluster("c", "x")]})
    assert cfg.kvcache.enabled is True
    assert cfg.kvcache.token_cache.enabled is True
    assert cfg.kvcache.route_on_miss is True


def test_unknown_shape_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"something": 1})
    assert info.value.field == "config"
    with pytest.raises(ConfigError):
        from_mapping(["not", "a", "mapping"])


def test_unknown_fields_are_ignored_not_fatal() -> None:
    cfg = from_mapping({"kvcache": {**KV, "no_such_knob": 5},
                        "clusters": [_cluster("c", "x")]})
    assert not hasattr(cfg.kvcache, "no_such_knob")


# ------------------------------------------------------------ clusters, endpoints, routes


def test_single_cluster_is_the_default_route() -> None:
    cfg = from_mapping({"kvcache": KV, "clusters": [_cluster("only", "a", "b")]})
    assert cfg.routes == [Route("/", "only")]
    assert cfg.route_for("/v1/completions").cluster == "only"


def test_route_without_cluster_uses_the_single_cluster() -> None:
    cfg = from_mapping({"kvcache": KV, "clusters": [_cluster("only", "a")],
                        "routes": [{"prefix": "/v1"}]})
    assert cfg.routes == [Route("/v1", "only")]


def test_two_clusters_need_routes() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"kvcache": KV, "clusters": [_cluster("a", "x"), _cluster("b", "y")]})
    assert info.value.field == "routes"


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ({"id": "a", "socket_address": {"address": "h", "port": 0}},
         "clusters[0].endpoints[0].socket_address.port"),
        ({"id": "a", "socket_address": {"address": "h", "port": 70000}},
         "clusters[0].endpoints[0].socket_address.port"),
        ({"id": "a", "socket_address": {"address": "h", "port": "8001"}},
         "clusters[0].endpoints[0].socket_address.port"),
        ({"id": "a", "socket_address": {"address": "h", "port": True}},
         "clusters[0].endpoints[0].socket_address.port"),
        ({"id": "a", "socket_address": {"address": "", "port": 80}},
         "clusters[0].endpoints[0].socket_address.address"),
        ({"id": "a", "socket_address": {"address": "h", "port": 80, "protocol": "ftp"}},
         "clusters[0].endpoints[0].socket_address.protocol"),
        ({"id": "a"}, "clusters[0].endpoints[0].socket_address"),
        ({"id": "", "socket_address": {"address": "h", "port": 80}},
         "clusters[0].endpoints[0].id"),
        ({"socket_address": {"address": "h", "port": 80}}, "clusters[0].endpoints[0].id"),
        ("h:80", "clusters[0].endpoints[0]"),
    ],
)
def test_endpoint_errors_name_the_field(endpoint: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"kvcache": KV, "clusters": [{"name": "c", "endpoints": [endpoint]}]})
    assert info.value.field == field


def test_duplicate_endpoint_id_is_refused() -> None:
    cluster = _cluster("c", "a", "b", "a")
    with pytest.raises(ConfigError) as info:
        from_mapping({"kvcache": KV, "clusters": [cluster]})
    assert info.value.field == "clusters[0].endpoints[2].id"
    assert "duplicate" in info.value.problem


def test_duplicate_cluster_name_and_empty_endpoints_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"kvcache": KV, "clusters": [_cluster("c", "a"), _cluster("c", "b")]})
    assert info.value.field == "clusters[1].name"
    with pytest.raises(ConfigError) as info:
        from_mapping({"kvcache": KV, "clusters": [{"name": "c", "endpoints": []}]})
    assert info.value.field == "clusters[0].endpoints"
    with pytest.raises(ConfigError) as info:
        from_mapping({"kvcache": KV, "clusters": []})
    assert info.value.field == "clusters"


def test_endpoint_properties() -> None:
    cfg = from_mapping({"kvcache": KV, "clusters": [{"name": "c", "endpoints": [
        {"id": 7, "socket_address": {"address": " host ", "port": 80}},
        {"id": "s", "socket_address": {"address": "h", "port": 443, "protocol": "HTTPS"}},
        {"id": "p", "socket_address": {"address": "h", "port": 8001}},
    ]}]})
    a, s, p = cfg.clusters["c"].endpoints
    assert (a.id, a.host, a.hostport, a.url) == ("7", "host", "host", "http://host:80")
    assert (s.scheme, s.hostport) == ("https", "h")
    assert (p.hostport, p.url) == ("h:8001", "http://h:8001")


def test_route_prefix_must_start_with_slash() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"kvcache": KV, "clusters": [_cluster("c", "a")],
                      "routes": [{"prefix": "v1", "cluster": "c"}]})
    assert info.value.field == "routes[0].prefix"


# ------------------------------------------------------------ load() and ConfigError text


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path / "nope.yaml"))
    assert info.value.field == "kvcache_config"
    assert "no such file" in str(info.value)


def test_load_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kvcache:\n  enabled: true\n  bad: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert "not valid YAML at line" in str(info.value)
    assert "\n" not in str(info.value)


def _config_errors() -> list[ConfigError]:
    docs: list[Any] = [
        {"kvcache": {**KV, "hot_max_records": "x" * 500}, "clusters": [_cluster("c", "a")]},
        {"kvcache": {**KV, "default_model": ["line1\nline2"]}, "clusters": [_cluster("c", "a")]},
        {"kvcache": {**KV, "cache_strategy": {"load_threshold": 1.5}},
         "clusters": [_cluster("c", "a")]},
        {"kvcache": {**KV, "vllm_endpoint": "not\na url"}, "clusters": [_cluster("c", "a")]},
        {"kvcache": KV, "clusters": [_cluster("a", "x"), _cluster("b", "y")],
         "routes": [{"prefix": "/", "cluster": "multi\nline"}]},
        {"kvcache": KV, "clusters": [{"name": "c", "endpoints": [{"id": "a\nb"}]}]},
        {"kvcache": "text\nblock"},
        {"weird": 1},
    ]
    errors = []
    for doc in docs:
        with pytest.raises(ConfigError) as info:
            from_mapping(doc)
        errors.append(info.value)
    return errors


def test_config_error_is_one_short_prefixed_line() -> None:
    for err in _config_errors():
        text = str(err)
        assert "\n" not in text and "\r" not in text, text
        assert text.startswith("[kvcache] config error: ")
        assert err.field in text
        assert len(text) < 300, text
