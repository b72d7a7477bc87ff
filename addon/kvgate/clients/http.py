"""HTTP calls to helper services (vLLM /tokenize, the LMCache controller).

urllib3 pools (requests' own engine, used directly: a requests.Session call cost about
twice the CPU per lookup here, on the request path; see README). Every call is bounded
by a Deadline, guarded by a circuit breaker and, where asked, retried with capped
exponential backoff.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import urllib3
from urllib3.exceptions import HTTPError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from ..config import KVCacheConfig, RetryConfig
from .breaker import BreakerOpen, CircuitBreaker
from .deadline import Cancelled, Deadline

log = logging.getLogger("kvgate")


_HEADERS = {"Content-Type": "application/json"}


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


def make_pool(cfg: KVCacheConfig) -> urllib3.PoolManager:
    """Pools sized by the seed's max_idle_conns* / max_conns_per_host knobs.

    max_idle_conns: how many hosts keep pools; max_idle_conns_per_host: connections kept
    per host (default: one per routing thread); max_conns_per_host > 0: a hard cap, callers
    wait for a free connection.
    """
    maxsize = cfg.max_idle_conns_per_host or max(cfg.routing_workers, 16)
    block = False
    if cfg.max_conns_per_host > 0:
        maxsize = cfg.max_conns_per_host
        block = True
    return urllib3.PoolManager(
        num_pools=max(cfg.max_idle_conns or 10, 1), maxsize=maxsize, block=block, retries=False
    )


def _plain(obj: Any) -> Any:
    """What orjson cannot write itself: token arrays (``array('I')``) become lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def decode_answer(name: str, path: str, status: int, data: bytes) -> Any:
    """JSON of a 2xx answer; otherwise the CallError that says whether to retry."""
    if status in (404, 405):
        raise Unsupported(f"{name} {path}: status {status}", status)
    if not 200 <= status < 300:
        # The answer body is left out: a 4xx from vLLM may echo the prompt.
        raise CallError(
            f"{name} {path}: status {status}",
            status=status,
            retryable=status >= 500,
        )
    try:  # strict JSON: NaN, Infinity and 1e400 are not numbers a helper may send
        return orjson.loads(data)
    except ValueError:
        raise CallError(f"{name} {path}: answer is not JSON", retryable=True) from None


def guarded(breaker: CircuitBreaker, exc: BaseException | None) -> None:
    """Tell the breaker how a call ended: transport failures and 5xx count, 4xx prove life."""
    if exc is None:
        breaker.success()
    elif isinstance(exc, CallError):
        if exc.retryable:
            breaker.failure()
        else:
            breaker.success()
    else:  # cancelled: proves nothing
        breaker.release()


def backoff_delay(attempt: int, retry: RetryConfig) -> float:
    """base * 2**attempt, capped at max_backoff (attempt counts from 0)."""
    return min(retry.base_backoff * (2 ** min(attempt, 30)), retry.max_backoff)


class HelperClient:
    def __init__(
        self,
        name: str,
        base_url: str,
        pool: urllib3.PoolManager,
        breaker: CircuitBreaker,
        retry: RetryConfig | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.pool = pool
        self.breaker = breaker
        self.retry = retry

    def _once(self, path: str, body: bytes, deadline: Deadline) -> Any:
        timeout = deadline.remaining()
        if timeout <= 0:
            raise Cancelled("deadline exceeded")
        try:
            resp = self.pool.request(
                "POST",
                self.base_url + path,
                body=body,
                headers=_HEADERS,
                timeout=urllib3.Timeout(total=timeout),
                pool_timeout=timeout,  # waiting for a capped pool counts against the deadline
                retries=False,
                redirect=False,
            )
        except Urllib3Timeout:
            raise CallError(f"{self.name} {path}: timed out", retryable=True) from None
        except (HTTPError, OSError) as exc:
            raise CallError(
                f"{self.name} {path}: {type(exc).__name__}", retryable=True
            ) from None
        return decode_answer(self.name, path, resp.status, resp.data)

    def post(self, path: str, payload: Any, deadline: Deadline, *, raw: bytes | None = None) -> Any:
        """POST JSON; retries (when configured) until success, a 4xx, or the deadline."""
        body = raw if raw is not None else orjson.dumps(payload, default=_plain)
        attempts = self.retry.max_attempts if self.retry else 1
        attempt = 0
        while True:
            deadline.check()
            if not self.breaker.allow():
                raise BreakerOpen(f"{self.name} circuit breaker open")
            try:
                result = self._once(path, body, deadline)
            except Cancelled as exc:
                guarded(self.breaker, exc)
                raise
            except CallError as exc:
                guarded(self.breaker, exc)
                if not exc.retryable or self.retry is None:
                    raise
                attempt += 1
                if attempt >= attempts:
                    raise
                if not deadline.sleep(backoff_delay(attempt - 1, self.retry)):
                    raise
                continue
            self.breaker.success()
            return result
