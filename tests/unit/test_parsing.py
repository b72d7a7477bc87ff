"""Request bodies beyond the seed: token-id prompts, chat content parts, hostile input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvgate.request.parsing import MAX_TOKEN_ID, NotParsed, cache_key, parse_body

ADDON = Path(__file__).resolve().parents[2] / "addon"


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


def test_cache_key_is_a_128_bit_hash_of_model_and_prompt_keyed_per_process() -> None:
    key = cache_key("m1", "prompt-1")
    assert len(key) == 32 and int(key, 16) >= 0
    assert cache_key("m1", "prompt-1") == key  # stable within the process
    assert cache_key("m1", "x") != cache_key("m2", "x")
    assert cache_key("m1", "prompt-1 ") != key
    # another process keys the same prompt differently: keys cannot be made to collide
    # from outside
    code = "from kvgate.request.parsing import cache_key; print(cache_key('m1', 'prompt-1'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONPATH": str(ADDON)}).stdout
    assert other.strip() != key and len(other.strip()) == 32


def test_lone_surrogate_prompt_is_keyed_without_error() -> None:
    parsed = parse_body(b'{"prompt": "\\ud800 text"}', "dflt")
    key = cache_key(parsed.model, parsed.key_text)
    assert len(key) == 32


# ---- big token-id bodies: decoded in slices off the event loop (issue 11, long prompts)

def _outcome(body: bytes, off_loop: bool) -> tuple[object, ...]:
    try:
        p = parse_body(body, "default-model", off_loop=off_loop)
    except NotParsed as e:
        return ("not parsed", str(e))
    ids = p.token_ids
    return (p.model, p.prompt, p.key, p.key_text, p.prefixes,
            None if ids is None else (list(ids), ids.json))


BIG = list(range(0, 120_000, 3)) + [MAX_TOKEN_ID, 0, 1, 0]


@pytest.mark.parametrize("body", [
    json.dumps({"model": "m", "prompt": BIG}).encode(),
    json.dumps({"model": "m", "prompt": BIG}, indent=1).encode(),  # whitespace everywhere
    json.dumps({"prompt": BIG, "model": 7}).encode(),  # bad model: the default
    json.dumps({"model": "m", "prompt": [BIG, [1, 2]]}).encode(),  # a batch: general path
    json.dumps({"model": "m", "prompt": BIG + [1.5]}).encode(),  # a float: not ids
    json.dumps({"model": "m", "prompt": BIG + [True]}).encode(),  # a bool: not ids
    json.dumps({"model": "m", "prompt": BIG + [-1]}).encode(),
    json.dumps({"model": "m", "prompt": BIG + [MAX_TOKEN_ID + 1]}).encode(),
    json.dumps({"model": "m", "prompt": BIG + [2**32]}).encode(),
    json.dumps({"model": "m", "prompt": BIG + [2**70]}).encode(),
    json.dumps({"model": "m", "prompt": BIG}).encode().replace(b", 3,", b", 03,"),  # not JSON
    json.dumps({"model": "m", "prompt": BIG}).encode()[:-2],  # truncated
    json.dumps({"model": "m", "prompt": []}).encode() + b" " * 200_000,
    b'{"model": "m", "prompt": [1, 2], "prompt": ' + json.dumps(BIG).encode() + b"}",
    b'{"model": "m", "x": {"prompt": [1, 2]}, "pr\\u006fmpt": ' + json.dumps(BIG).encode()
    + b"}",
    json.dumps({"model": "m", "prompt": "text " * 40_000}).encode(),
    json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 200_000}],
                "prompt": None}).encode(),
], ids=["ids", "indented", "bad-model", "batch", "float", "bool", "negative", "over-max",
        "over-u32", "huge", "leading-zero", "truncated", "empty", "duplicate-key",
        "escaped-key", "text", "chat"])
def test_big_bodies_parse_alike_on_and_off_the_loop(body: bytes) -> None:
    """Off the loop a big body's ids are decoded in slices (msgspec finds the prompt, orjson
    decodes 64 KiB at a time); the outcome must be the one-call parse's, bad input too."""
    assert len(body) > 128 * 1024
    assert _outcome(body, off_loop=True) == _outcome(body, off_loop=False)


def test_a_big_id_list_is_decoded_in_slices_with_pauses() -> None:
    from kvgate.request import parsing

    body = json.dumps({"model": "m", "prompt": BIG}).encode()
    pauses: list[int] = []
    parsed = parsing._big_ids(body, "d", lambda: pauses.append(1))
    assert parsed is not None and list(parsed.token_ids or []) == BIG
    # one pause a 64 KiB slice, and one before the first
    assert len(pauses) == 1 + -(-len(json.dumps(BIG).replace(" ", "")) // parsing.SLICE)
    assert parsed.token_ids is not None and parsed.token_ids.json == json.dumps(
        BIG, separators=(",", ":")).encode()
