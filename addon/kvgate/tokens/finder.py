"""Stage 2: a prompt's token ids, from the cheapest place that has them.

In order: the ids the client sent; the token cache; an earlier turn of the same chat (its
tokens are enough to ask where the conversation lives); the model's own tokenizer,
in-process; the engine's ``POST /tokenize``. The last two only when ``route_on_miss`` (the
seed routes exact repeats only).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext

from ..clients.aio_http import AsyncHelper
from ..clients.tokenizer import tokens_from
from ..config import ConfigError
from ..observability.counters import Counters
from ..request.parsing import ParsedRequest, cache_key
from .cache import TokenCache, Tokens
from .local import LocalTokenizer, TokenizerLoadError

log = logging.getLogger("kvgate")


def load_tokenizers(paths: dict[str, str]) -> dict[str, LocalTokenizer]:
    """``tokenizers:`` of the config; a file that cannot be read is a config error."""
    out: dict[str, LocalTokenizer] = {}
    for model, path in paths.items():
        try:
            out[model] = LocalTokenizer(path)
        except TokenizerLoadError as exc:
            raise ConfigError(f"tokenizers.{model}", path, str(exc)) from None
    return out


class TokenFinder:
    def __init__(self, cache: TokenCache, local: dict[str, LocalTokenizer],
                 remote: AsyncHelper, pool: Executor, counters: Counters,
                 timer: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        self.cache = cache
        self.local = local
        self.remote = remote
        self.pool = pool  # tokenizing a long prompt must not stall the event loop
        self.counters = counters
        self._timer = timer

    def known(self, parsed: ParsedRequest, key: str,
              earlier_turns: bool) -> tuple[Tokens | None, Tokens | None]:
        """(the prompt's tokens, an earlier turn's tokens) from what is at hand, no I/O."""
        tokens = parsed.token_ids if parsed.token_ids is not None else self.cache.get(key)
        if tokens is not None or not earlier_turns:
            return tokens, None
        # a new turn: an earlier turn's prompt is a prefix of this one, and its tokens
        # are enough to ask LMCache where the conversation lives
        for earlier in parsed.prefixes:
            prefix = self.cache.peek(cache_key(parsed.model, earlier))
            if prefix is not None:
                self.counters.inc("tokenize.prefix_reused")
                return None, prefix
        return None, None

    async def tokenize(self, parsed: ParsedRequest, key: str, body: bytes,
                       end: float) -> Tokens:
        """In-process when this model's tokenizer can, else the engine's /tokenize; by
        ``end`` (loop time). Failures are counted and raised for the caller to fall back."""
        loop = asyncio.get_running_loop()
        try:
            if parsed.model in self.local:
                with self._timer():
                    tokens = await asyncio.wait_for(
                        loop.run_in_executor(self.pool, self.local_tokens, parsed),
                        max(end - loop.time(), 0.0))
                if tokens is not None:
                    return self._found(key, tokens, "tokenize.local")
            with self._timer():
                answer = await self.remote.post("/tokenize", body, end - loop.time())
            return self._found(key, tokens_from(answer), "tokenize.routing_ok")
        except Exception:
            self.counters.inc("tokenize.routing_failed")
            raise

    def _found(self, key: str, tokens: Tokens, counter: str) -> Tokens:
        self.counters.inc(counter)
        self.cache.put(key, tokens)
        return tokens

    def local_tokens(self, parsed: ParsedRequest) -> Tokens | None:
        """In-process tokens for this model, or None (no tokenizer, or only vLLM can say)."""
        tok = self.local.get(parsed.model)
        if tok is None:
            return None
        try:
            return tok.encode_body(parsed.payload) or None
        except Exception as exc:  # the library on odd input: the engine's /tokenize decides
            self.counters.inc("tokenize.local_failed")
            log.debug("[kvcache] local tokenizer failed: %s", type(exc).__name__)
            return None
