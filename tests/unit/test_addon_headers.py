"""The addon's raw header read: any case, first value, absent is empty."""

from __future__ import annotations

from mitmproxy import http

from kvgate.addon import _header


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
