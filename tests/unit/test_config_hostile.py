"""Config inputs of odd shapes still end as one-line ConfigErrors, never other exceptions."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate import config
from kvgate.engine_faults import _is_connect_failure


def _doc(**over: object) -> dict:
    doc: dict = {
        "kvcache": {"vllm_endpoint": "http://127.0.0.1:1", "lmcache_endpoint": "http://127.0.0.1:2"},
        "clusters": [{"name": "c", "endpoints": [
            {"id": "e1", "socket_address": {"address": "127.0.0.1", "port": 8001}}]}],
    }
    doc.update(over)
    return doc


def test_route_naming_a_list_as_cluster() -> None:
    with pytest.raises(config.ConfigError, match=r"routes\[0\]\.cluster"):
        config.from_mapping(_doc(routes=[{"prefix": "/", "cluster": ["c"]}]))


def test_mapping_with_mixed_key_types() -> None:
    with pytest.raises(config.ConfigError, match="unknown shape"):
        config.from_mapping({1: "a", "b": 2})


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kvcache:\n  default_model: \xe9t\xe9\n")
    with pytest.raises(config.ConfigError, match="not UTF-8") as info:
        config.load(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("msg", "ejects"),
    [
        ("[Errno 111] Connect call failed ('127.0.0.1', 9)", True),
        ("Cannot connect to 127.0.0.1:9: refused", True),
        ("[Errno 113] No route to host: host unreachable", True),
        ("Connection killed.", False),
        ("Server disconnected.", False),
        ("Client disconnected.", False),
    ],
)
def test_only_connect_failures_eject(msg: str, ejects: bool) -> None:
    assert _is_connect_failure(msg) is ejects
