"""HTTP calls to helper services (vLLM /tokenize, the LMCache controller).

requests sessions with sized pools; every call is bounded by a Deadline, guarded by a
circuit breaker and, where asked, retried with capped exponential backoff.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from .breaker import BreakerOpen, CircuitBreaker
from .config import KVCacheConfig, RetryConfig
from .deadline import Cancelled, Deadline

log = logging.getLogger("kvgate")


class CallError(Exception):
    """A failed call; ``retryable`` for 5xx, timeouts and connection errors."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class Unsupported(CallError):
    """The helper does not have this action (404/405)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, status=status, retryable=False)


def make_session(cfg: KVCacheConfig) -> requests.Session:
    """A session whose pool matches the seed's max_idle_conns* / max_conns_per_host knobs."""
    session = requests.Session()
    maxsize = cfg.max_idle_conns_per_host or max(cfg.routing_workers, 16)
    block = False
    if cfg.max_conns_per_host > 0:
        maxsize = cfg.max_conns_per_host
        block = True
    adapter = HTTPAdapter(
        pool_connections=max(cfg.max_idle_conns or 10, 1),
        pool_maxsize=maxsize,
        pool_block=block,
        max_retries=0,
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False  # helpers are addressed directly, never via HTTP_PROXY
    return session


def backoff_delay(attempt: int, retry: RetryConfig) -> float:
    """base * 2**attempt, capped at max_backoff (attempt counts from 0)."""
    return min(retry.base_backoff * (2 ** min(attempt, 30)), retry.max_backoff)


class HelperClient:
    def __init__(
        self,
        name: str,
        base_url: str,
        session: requests.Session,
        breaker: CircuitBreaker,
        retry: RetryConfig | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.breaker = breaker
        self.retry = retry

    def _once(self, path: str, body: bytes, deadline: Deadline) -> Any:
        timeout = deadline.remaining()
        if timeout <= 0:
            raise Cancelled("deadline exceeded")
        try:
            resp = self.session.post(
                self.base_url + path,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=timeout,
            )
        except requests.Timeout:
            raise CallError(f"{self.name} {path}: timed out", retryable=True) from None
        except requests.RequestException as exc:
            raise CallError(
                f"{self.name} {path}: {type(exc).__name__}", retryable=True
            ) from None
        status = resp.status_code
        if status in (404, 405):
            raise Unsupported(f"{self.name} {path}: status {status}", status)
        if status >= 500:
            raise CallError(
                f"{self.name} {path}: status {status}: {resp.text[:200]!r}",
                status=status,
                retryable=True,
            )
        if not 200 <= status < 300:
            raise CallError(
                f"{self.name} {path}: status {status}: {resp.text[:200]!r}",
                status=status,
                retryable=False,
            )
        try:
            return resp.json()
        except ValueError:
            raise CallError(f"{self.name} {path}: answer is not JSON", retryable=True) from None

    def post(self, path: str, payload: Any, deadline: Deadline, *, raw: bytes | None = None) -> Any:
        """POST JSON; retries (when configured) until success, a 4xx, or the deadline."""
        body = raw if raw is not None else json.dumps(payload, separators=(",", ":")).encode()
        attempts = self.retry.max_attempts if self.retry else 1
        attempt = 0
        while True:
            deadline.check()
            if not self.breaker.allow():
                raise BreakerOpen(f"{self.name} circuit breaker open")
            try:
                result = self._once(path, body, deadline)
            except Cancelled:
                self.breaker.release()
                raise
            except CallError as exc:
                if exc.retryable:
                    self.breaker.failure()
                else:
                    # The helper answered: it is alive, the request was refused.
                    self.breaker.success()
                    raise
                attempt += 1
                if attempt >= attempts or self.retry is None:
                    raise
                if not deadline.sleep(backoff_delay(attempt - 1, self.retry)):
                    raise
                continue
            self.breaker.success()
            return result
