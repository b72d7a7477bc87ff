"""Reading model and prompt out of an OpenAI-style request body, without trusting it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True)
class ParsedRequest:
    model: str
    prompt: str
    """The text the seed keys on (string prompt, joined list items or message contents)."""
    token_ids: tuple[int, ...] | None
    """Token ids given by the client (completions with an int-list prompt)."""
    prefixes: tuple[str, ...] = ()
    """Chat only: the key texts of the conversation's earlier shapes (all messages but the
    last one, but the last two, ...), longest first: an earlier turn's prompt."""
    payload: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The decoded body, for a local tokenizer (it needs the messages and roles)."""

    @property
    def key_text(self) -> str:
        if self.token_ids is not None and not self.prompt:
            return "ids:" + ",".join(map(str, self.token_ids))
        return self.prompt


class NotParsed(Exception):
    """The body is not something we route on; the reason is safe to log (no prompt text)."""


def cache_key(model: str, text: str) -> str:
    """The seed's key: SHA-256 of model + NUL + prompt. Also what logs show instead of text."""
    return hashlib.sha256((model + "\x00" + text).encode("utf-8", "surrogatepass")).hexdigest()


def _is_token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_ID
            for v in value
        )
    )


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(item for item in value if isinstance(item, str))
    return ""


def _prompt_ids(value: Any) -> tuple[int, ...] | None:
    """Token ids from `[1, 2]` or `[[1, 2], [3]]` (the batch's first prompt routes)."""
    if _is_token_list(value):
        return tuple(value)
    if isinstance(value, list) and value and all(_is_token_list(v) for v in value):
        return tuple(value[0])
    return None


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


def parse_body(body: bytes, default_model: str) -> ParsedRequest:
    """Model and prompt from a completions or chat body; NotParsed when we should not route."""
    if not body:
        raise NotParsed("empty body")
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
    ids = _prompt_ids(raw_prompt)
    text = "" if ids is not None else _prompt_text(raw_prompt)
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
