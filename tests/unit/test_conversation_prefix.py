"""A new turn routes on the tokens of an earlier turn, with no tokenize on the request path."""

from __future__ import annotations

import json

from kvgate.request.parsing import parse_body

from unit_support import calls, paths


def _chat(*contents: str) -> bytes:
    roles = ["system", "user", "assistant"]
    msgs = [{"role": roles[min(i, 1) if i < 2 else 2 - i % 2], "content": c}
            for i, c in enumerate(contents)]
    return json.dumps({"model": "m", "messages": msgs}).encode()


def test_prefixes_are_earlier_conversation_shapes_longest_first() -> None:
    parsed = parse_body(_chat("sys", "q1", "a1", "q2"), "")
    assert parsed.prompt == "sys\nq1\na1\nq2"
    assert parsed.prefixes == ("sys\nq1\na1", "sys\nq1", "sys")
    assert parse_body(b'{"prompt": "x"}', "").prefixes == ()


def test_second_turn_routes_on_the_first_turns_tokens(make_gateway, engine, controller) -> None:
    gw = make_gateway({"token_cache": {"enabled": True}})
    first = gw.route("vllm", _chat("be brief " * 20, "what is x"))
    assert first.tokens is not None
    engine.calls.clear()
    controller.calls.clear()
    second = gw.route("vllm", _chat("be brief " * 20, "what is x", "x is y", "and z"))
    assert "/tokenize" not in paths(engine)  # nothing tokenized on the request path
    lookups = calls(controller, "/lookup")
    assert lookups[-1]["tokens"] == list(first.tokens)
    assert second.tokens is None and second.prefix_tokens == first.tokens
    assert gw.counters.get("tokenize.prefix_reused") == 1
