"""Reading model and prompt out of an OpenAI-style request body, without trusting it."""

from __future__ import annotations

import json
import os
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
import xxhash

from ..tokens.cache import PackedTokens

MAX_TOKEN_ID = 2**31 - 1
# ids spelled out in the text of a token-id prompt (for text-matching policies and the
# prefix index, which reads 64 KiB at most): a prefix is identity enough, and joining
# 128k ids costs ~10 ms of the event loop
TEXT_IDS = 512
_HIGH = 3 if sys.byteorder == "little" else 0  # the byte holding an id's top bit
_LOW7 = bytes(range(128))
_ZERO_ONE = (array("I", [0]).tobytes(), array("I", [1]).tobytes())


@dataclass(slots=True)  # one a request: not frozen (see policies.base.Decision)
class ParsedRequest:
    model: str
    prompt: str
    """The text the seed keys on (string prompt, joined list items or message contents)."""
    token_ids: PackedTokens | None
    """Token ids given by the client (completions with an int-list prompt), packed."""
    prefixes: tuple[str, ...] = ()
    """Chat only: the key texts of the conversation's earlier shapes (all messages but the
    last one, but the last two, ...), longest first: an earlier turn's prompt."""
    payload: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The decoded body, for a local tokenizer (it needs the messages and roles)."""

    ids_text: str = field(default="", compare=False, repr=False)
    ids_key: str = field(default="", compare=False, repr=False)

    @property
    def key_text(self) -> str:
        """The text policies and the prefix index read: the prompt, or for token ids the
        first ``TEXT_IDS`` of them spelled out (made once, with the parse)."""
        return self.ids_text if self.token_ids is not None and not self.prompt else self.prompt

    @property
    def key(self) -> str:
        """The prompt's key: ``cache_key`` of model and text; for token ids a hash of the
        packed ids (all of them, in C: no text is built)."""
        return self.ids_key or cache_key(self.model, self.prompt)


_KEY_SEED = int.from_bytes(os.urandom(8), "little")
"""Per process: nobody outside can pick two prompts that share a key."""


def _ids_request(model: str, ids: PackedTokens) -> ParsedRequest:
    h = xxhash.xxh3_128((model + "\x00ids:").encode("utf-8", "surrogatepass"), seed=_KEY_SEED)
    h.update(ids.data)
    text = "ids:" + ",".join(map(str, ids[:TEXT_IDS].tolist()))
    return ParsedRequest(model=model, prompt="", token_ids=ids, ids_text=text,
                         ids_key=h.hexdigest())


class NotParsed(Exception):
    """The body is not something we route on; the reason is safe to log (no prompt text)."""


def cache_key(model: str, text: str) -> str:
    """The prompt's key (token cache, hot tracker, ``prompt_hash`` in logs and flows): the
    seed's SHA-256 of model + NUL + prompt, as a 128-bit XXH3 keyed per process. SHA-256
    cost 28 instructions a byte where the CPU has no SHA extensions (and under callgrind),
    ~45 000 for a 1.6 KB prompt; XXH3 costs under 1 000, and 5x less time here with them."""
    return xxhash.xxh3_128_hexdigest((model + "\x00" + text).encode("utf-8", "surrogatepass"),
                                     seed=_KEY_SEED)


def _token_array(value: Any) -> array[int] | None:
    """The ids of a list of token ids (ints 0..MAX_TOKEN_ID, no bools), else None.

    Checked in C: ``array`` refuses floats, strings and negatives, ``max`` bounds them;
    a bool can only hide among the 0s and 1s, which are few and looked at one by one.
    A Python loop over 128k ids cost ~5 ms of the event loop."""
    if not isinstance(value, list) or not value:
        return None
    try:
        ids = array("I", value)
    except (TypeError, OverflowError):
        return None
    data = ids.tobytes()
    if data[_HIGH::4].translate(None, _LOW7):  # an id with its top bit set: > 2**31-1
        return None
    if any(z in data for z in _ZERO_ONE):  # maybe 0s or 1s: is any of them a bool?
        for target in (0, 1):
            start = 0
            for _ in range(value.count(target)):
                i = value.index(target, start)
                if type(value[i]) is bool:
                    return None
                start = i + 1
    return ids


def _is_token_list(value: Any) -> bool:
    return _token_array(value) is not None


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(item for item in value if isinstance(item, str))
    return ""


def _prompt_ids(value: Any) -> PackedTokens | None:
    """Token ids from `[1, 2]` or `[[1, 2], [3]]` (the batch's first prompt routes)."""
    if not isinstance(value, list) or not value:
        return None
    if isinstance(value[0], list):
        first = _token_array(value[0])
        if first is not None and all(_is_token_list(v) for v in value[1:]):
            return PackedTokens(first.tobytes(), orjson.dumps(value[0]))
        return None
    ids = _token_array(value)
    # the /lookup body's list, encoded now from the ints at hand (off the event loop for
    # a big body); from the packed ids later it would cost 10x more (ints re-made)
    return PackedTokens(ids.tobytes(), orjson.dumps(value)) if ids is not None else None


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts) if texts else None
    return None


def _messages_parts(messages: Any) -> list[str | None]:
    """Per message its text (None: no text), so prefixes by message count can be rebuilt."""
    if not isinstance(messages, list):
        return []
    return [_content_text(m.get("content")) if isinstance(m, dict) else None
            for m in messages]


def _join(parts: list[str | None]) -> str:
    return "\n".join(p for p in parts if p is not None).strip()


MAX_PREFIXES = 8  # earlier conversation shapes probed on a token-cache miss


def _nothing() -> None:
    pass


def _let_the_loop_run() -> None:
    """Give the GIL away between stages: on a routing thread, a long body's C-level stages
    (decode, pack, encode, free) otherwise hold the event loop for all of them at once."""
    time.sleep(0)


class _Shape(msgspec.Struct):
    """What a big token-id body is routed on; the prompt is kept as its JSON text."""

    model: Any = None
    prompt: msgspec.Raw = msgspec.Raw(b"")


_SHAPE = msgspec.json.Decoder(_Shape)
_SPACE = b" \t\r\n"
_ID_CHARS = b"0123456789,"
SLICE = 64 * 1024  # bytes of ids decoded per C call (~0.3 ms here)


def _big_ids(body: bytes, default_model: str,
             pause: Callable[[], None]) -> ParsedRequest | None:
    """A big body whose prompt is one flat list of ids, decoded in slices with the GIL
    given away between them: ``orjson.loads`` of a 128k-id body is one C call of 4-6 ms
    that holds the event loop. msgspec checks the whole body and hands back the prompt's
    JSON text unparsed (~1 ms); a text of only digits and commas splits at any comma into
    valid lists, and is already the compact JSON the ``/lookup`` body needs. None: not
    such a body (the general path decides)."""
    try:
        shape = _SHAPE.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    model = shape.model if isinstance(shape.model, str) and shape.model else default_model
    flat = bytes(shape.prompt).translate(None, _SPACE)
    del shape
    if len(flat) < 3 or flat[0] != 0x5B or flat[-1] != 0x5D:  # not a non-empty [...]
        return None
    if flat.translate(None, _ID_CHARS) != b"[]":  # floats, signs, bools, nested lists
        return None
    pause()
    ids: array[int] = array("I")
    i, end = 1, len(flat) - 1
    try:
        while i < end:
            j = flat.find(b",", min(i + SLICE, end))
            j = end if j < 0 else j
            ids.extend(orjson.loads(b"[" + flat[i:j] + b"]"))
            i = j + 1
            pause()
    except (ValueError, OverflowError, TypeError):  # leading zeros; > 2**32-1; > 2**64
        return None
    data = ids.tobytes()
    if data[_HIGH::4].translate(None, _LOW7):  # an id > 2**31-1
        return None
    return _ids_request(model, PackedTokens(data, flat))


def parse_body(body: bytes, default_model: str, off_loop: bool = False) -> ParsedRequest:
    """Model and prompt from a completions or chat body; NotParsed when we should not route.
    ``off_loop``: on a routing thread, pause between stages for the event loop."""
    pause = _let_the_loop_run if off_loop else _nothing
    if not body:
        raise NotParsed("empty body")
    if off_loop and b'"prompt"' in body:
        big = _big_ids(body, default_model, pause)
        if big is not None:
            return big
    try:  # orjson: 2-3x faster; json for what it refuses (lone surrogates, NaN)
        payload = orjson.loads(body)
    except (ValueError, RecursionError):
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotParsed("body is not JSON") from None
    if not isinstance(payload, dict):
        raise NotParsed("JSON body is not an object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        model = default_model
    raw_prompt = payload.get("prompt")
    pause()
    ids = _prompt_ids(raw_prompt)
    if ids is not None:  # nothing else in the body is read again: its 128k ints are freed
        del raw_prompt  # here (~1 ms), and the key made here, off the loop for a big body
        payload.clear()
        pause()
        return _ids_request(model, ids)
    text = _prompt_text(raw_prompt)
    prefixes: list[str] = []
    if ids is None and not text:
        parts = _messages_parts(payload.get("messages"))
        text = _join(parts)
        for k in range(len(parts) - 1, max(0, len(parts) - 1 - MAX_PREFIXES), -1):
            earlier = _join(parts[:k])
            if earlier and earlier != text and (not prefixes or earlier != prefixes[-1]):
                prefixes.append(earlier)
    text = text.strip()
    if ids is None and not text:
        raise NotParsed("no prompt")
    return ParsedRequest(model=model, prompt=text, token_ids=ids, prefixes=tuple(prefixes),
                         payload=payload)
