"""Engines learnt from the LMCache registry (/query_worker_info with instance_id "all")."""

from __future__ import annotations

from typing import Any

import pytest

from kvgate.clients.http import CallError
from kvgate.config import ConfigError, Endpoint, from_mapping
from kvgate.fleet.discovery import parse_workers, plan
from kvgate.gateway import Gateway

from unit_support import gateway_doc


def _info(iid: str, ip: str = "10.0.0.5", worker: int = 0) -> dict[str, Any]:
    return {"instance_id": iid, "worker_id": worker, "ip": ip, "port": 8400 + worker,
            "peer_init_url": None, "registration_time": 1.0, "last_heartbeat_time": 2.0}


def test_parse_workers_keeps_one_address_per_instance_and_skips_junk() -> None:
    answer = {"event_id": "e", "worker_infos": [
        _info("a", "10.0.0.1"), _info("a", "10.0.0.9", 1), _info("b", "10.0.0.2"),
        "junk", {"instance_id": 3, "ip": "x"}, {"instance_id": "c"}]}
    assert parse_workers(answer) == {"a": "10.0.0.1", "b": "10.0.0.2"}
    with pytest.raises(CallError):
        parse_workers({"detail": "boom"})


def test_plan_adds_unknown_instances_at_engine_port_and_drops_forgotten_ones() -> None:
    known = {"old": Endpoint("old", "10.0.0.7", 8000)}
    add, drop = plan({"cfg-1"}, known, {"cfg-1": "10.0.0.1", "new": "10.0.0.3"}, 8000, "http")
    assert add == [Endpoint("new", "10.0.0.3", 8000)]
    assert drop == ["old"]  # configured endpoints are never dropped or re-addressed
    # a moved instance is re-addressed; an unchanged one is left alone
    add, drop = plan(set(), {"new": Endpoint("new", "10.0.0.3", 8000)},
                     {"new": "10.0.0.4"}, 8000, "http")
    assert add == [Endpoint("new", "10.0.0.4", 8000)] and drop == []
    assert plan(set(), {}, {"x": "10.0.0.3"}, 0, "http") == ([], [])  # no port: not added


def _gateway(engine, controller, **disc: Any) -> Gateway:
    doc = gateway_doc(engine.url, controller.url,
                      {"discovery": {"enabled": True, "interval": "1h", **disc}},
                      endpoint_ids=("vllm-1",))
    return Gateway(from_mapping(doc))


def test_poll_joins_registered_engines_and_flags_unregistered_ones(engine, controller) -> None:
    controller.workers = [_info("vllm-9", "127.0.0.1")]
    gw = _gateway(engine, controller, engine_port=18099)
    try:
        assert gw.fleet.discovery is not None and gw.fleet.discovery.poll()
        cluster = gw.fleet.clusters["vllm"]
        assert [ep.id for ep in cluster.endpoints] == ["vllm-1", "vllm-9"]
        assert cluster.by_id["vllm-9"].url == "http://127.0.0.1:18099"
        assert [ep.id for ep in gw.fleet.monitor.endpoints] == ["vllm-1", "vllm-9"]
        assert gw.stats()["discovery"] == {"discovered": ["vllm-9"], "unregistered": ["vllm-1"]}
        controller.workers = []
        assert gw.fleet.discovery.poll()
        assert [ep.id for ep in cluster.endpoints] == ["vllm-1"]
    finally:
        gw.close()


def test_poll_survives_a_controller_without_registry(engine, controller) -> None:
    controller.script["/query_worker_info"] = [500]
    gw = _gateway(engine, controller, engine_port=18099)
    try:
        assert gw.fleet.discovery is not None and not gw.fleet.discovery.poll()
        assert gw.counters.get("discovery.failed") == 1
        assert [ep.id for ep in gw.fleet.clusters["vllm"].endpoints] == ["vllm-1"]
    finally:
        gw.close()


def test_discovery_config_rules(engine, controller) -> None:
    for disc, match in (({"cluster": "nope"}, "discovery.cluster"),
                        ({"engine_port": 70000}, "discovery.engine_port"),
                        ({"engine_scheme": "ftp"}, "discovery.engine_scheme"),
                        ({"interval": "-1s"}, "discovery.interval")):
        doc = gateway_doc(engine.url, controller.url, {"discovery": {"enabled": True, **disc}})
        with pytest.raises(ConfigError, match=match):
            from_mapping(doc)
    cfg = from_mapping(gateway_doc(engine.url, controller.url, {"discovery": {"enabled": True}}))
    assert cfg.kvcache.discovery.cluster == "vllm" and cfg.kvcache.discovery.interval == 10.0


def test_discovery_keeps_every_clusters_endpoints_in_the_monitor(engine, controller) -> None:
    doc = gateway_doc(engine.url, controller.url,
                      {"discovery": {"enabled": True, "interval": "1h", "cluster": "vllm",
                                     "engine_port": 18099}},
                      endpoint_ids=("vllm-1",))
    doc["clusters"].append({"name": "other", "endpoints": [
        {"id": "o-1", "socket_address": {"address": "127.0.0.1", "port": 18111}}]})
    doc["routes"] = [{"prefix": "/v1/", "cluster": "vllm"}, {"prefix": "/o/", "cluster": "other"}]
    controller.workers = [_info("vllm-9", "127.0.0.1")]
    gw = Gateway(from_mapping(doc))
    try:
        assert gw.fleet.discovery is not None and gw.fleet.discovery.poll()
        assert sorted(ep.id for ep in gw.fleet.monitor.endpoints) == ["o-1", "vllm-1", "vllm-9"]
    finally:
        gw.close()
