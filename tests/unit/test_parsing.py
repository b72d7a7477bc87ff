"""Request bodies beyond the seed: token-id prompts, chat content parts, hostile input."""

from __future__ import annotations

import hashlib
import json

import pytest

from kvgate.request.parsing import MAX_TOKEN_ID, NotParsed, cache_key, parse_body


def _parse(payload: object, default_model: str = "dflt"):
    return parse_body(json.dumps(payload).encode(), default_model)


def test_token_id_prompt_is_used_directly() -> None:
    parsed = _parse({"model": "m", "prompt": [1, 2, 3]})
    assert parsed.token_ids == (1, 2, 3)
    assert parsed.prompt == ""
    assert parsed.key_text == "ids:1,2,3"


def test_batch_of_token_id_lists_routes_on_the_first() -> None:
    parsed = _parse({"model": "m", "prompt": [[5, 6, 7], [8]]})
    assert parsed.token_ids == (5, 6, 7)


@pytest.mark.parametrize("prompt", [[True, 2], [-1, 2], [MAX_TOKEN_ID + 1], [1.5, 2],
                                    [[1], []], [[1, 2], [True]]])
def test_not_token_ids(prompt: object) -> None:
    with pytest.raises(NotParsed):
        _parse({"prompt": prompt})


def test_prompt_list_keeps_only_strings() -> None:
    assert _parse({"prompt": ["a", 3, None, "b"]}).prompt == "a\nb"
    mixed = _parse({"prompt": [[1, 2], "x"]})
    assert (mixed.token_ids, mixed.prompt) == (None, "x")


def test_chat_content_parts_contribute_text_parts() -> None:
    parsed = _parse({"model": "m", "messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [
            {"type": "text", "text": "look at"},
            {"type": "image_url", "image_url": {"url": "http://x/img.png"}},
            {"text": "untyped part counts as text"},
            {"type": "text", "text": 42},
            "not a part",
        ]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
        {"role": "assistant", "content": None},
        "not a message",
    ]})
    assert parsed.prompt == "sys\nlook at\nuntyped part counts as text"
    assert parsed.token_ids is None


def test_prompt_wins_over_messages() -> None:
    assert _parse({"prompt": "p", "messages": [{"role": "user", "content": "m"}]}).prompt == "p"


def test_empty_prompt_falls_back_to_messages() -> None:
    assert _parse({"prompt": "", "messages": [{"role": "user", "content": "m"}]}).prompt == "m"


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"\xff\xfe\x00g", b"[1, 2]", b'"text"', b'{"model": "m"}',
     b'{"prompt": "   "}', b'{"prompt": 5}', b'{"messages": "hi"}',
     b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     b"[" * 100_000],
)
def test_not_routable_bodies(body: bytes) -> None:
    with pytest.raises(NotParsed):
        parse_body(body, "dflt")


@pytest.mark.parametrize("model", [None, "", 5, ["m"]])
def test_bad_model_takes_default(model: object) -> None:
    assert _parse({"model": model, "prompt": "p"}, "dflt").model == "dflt"


def test_cache_key_is_sha256_of_model_nul_prompt() -> None:
    want = hashlib.sha256(b"m1\x00prompt-1").hexdigest()
    assert cache_key("m1", "prompt-1") == want
    assert cache_key("m1", "x") != cache_key("m2", "x")


def test_lone_surrogate_prompt_is_keyed_without_error() -> None:
    parsed = parse_body(b'{"prompt": "\\ud800 text"}', "dflt")
    key = cache_key(parsed.model, parsed.key_text)
    assert len(key) == 64
