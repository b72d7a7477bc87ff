"""vLLM's ``POST /tokenize``: the engine's own tokens for a request body."""

from __future__ import annotations

from typing import Any

from .deadline import Deadline
from .http import CallError, HelperClient

Tokens = tuple[int, ...]


def tokens_from(answer: Any) -> Tokens:
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise CallError("tokenize: answer has no token list", retryable=False)
    return tuple(tokens)


class Tokenizer:
    """vLLM ``POST /tokenize``, forwarding the client's raw body as the seed does."""

    def __init__(self, client: HelperClient) -> None:
        self.client = client

    def tokenize(self, raw_body: bytes, deadline: Deadline) -> Tokens:
        return tokens_from(self.client.post("/tokenize", None, deadline, raw=raw_body))
