"""The addon's raw header reads (any case, first value, absent is empty) and what the
script module shows mitmproxy."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from mitmproxy import hooks, http
from mitmproxy.addons import script
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from kvgate.addon import _header, _unparseable


def test_header_is_found_in_any_case_and_the_first_value_wins() -> None:
    headers = http.Headers([(b"Content-Type", b"text/event-stream"),
                            (b"content-type", b"application/json"),
                            (b"CONTENT-ENCODING", b"gzip")])
    assert _header(headers, b"content-type") == "text/event-stream"
    assert _header(headers, b"content-encoding") == "gzip"
    assert _header(headers, b"x-missing") == ""


def test_header_values_outside_ascii_do_not_raise() -> None:
    headers = http.Headers([(b"content-type", "text/plain; x=\xe9".encode("latin-1"))])
    assert _header(headers, b"content-type") == "text/plain; x=\xe9"


def _post(headers: list[tuple[bytes, bytes]]) -> http.Request:
    return http.Request.make("POST", "http://127.0.0.1:9001/v1/completions", b"{}",
                             headers)


def test_a_compressed_body_is_found_in_any_spelling_and_identity_is_read() -> None:
    gw = SimpleNamespace(kv=SimpleNamespace(max_body_bytes=1 << 20))
    assert _unparseable(gw, _post([(b"Content-ENCODING", b"gzip")])) == "compressed body"
    assert _unparseable(gw, _post([(b"content-encoding", b" Identity ")])) is None
    # the name inside another header's name is not the header
    assert _unparseable(gw, _post([(b"x-content-encoding-note", b"gzip")])) is None
    assert _unparseable(gw, _post([])) is None


def test_the_script_module_answers_every_event_name_and_only_the_addon_hooks() -> None:
    """mitmproxy asks the script's module for each event by name before its addons: a
    miss builds an AttributeError (Python 3.11), so every name is bound, to None."""
    ns = script.load_script(str(Path(__file__).resolve().parents[2] / "addon" / "kvcache.py"))
    assert ns is not None
    for name in hooks.all_hooks:
        assert name in vars(ns) and not callable(vars(ns)[name]), name
    assert [type(a).__name__ for a in ns.addons] == ["KVCacheAddon"]
    with taddons.context() as tctx:
        flow = tflow.tflow()
        found = list(tctx.master.addons._iter_hooks(ns, HttpRequestHook(flow)))
        assert [type(a).__name__ for a, _ in found] == ["KVCacheAddon"]

