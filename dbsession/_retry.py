"""Running a function in a transaction again when the database reports a transient failure.

Which errors are transient is the table in ``_classify.TRANSIENT``. Each attempt
is a fresh scope; a failed attempt is rolled back whole (its ``on_commit`` hooks
dropped) and, after a jittered exponential backoff, the function runs again from
the start. Every retry is logged at INFO on the ``dbsession`` logger.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

from sqlalchemy.orm import Session

from ._classify import transient_reason
from ._errors import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    RetryExhaustedError,
    ScopeTimeoutError,
)

logger = logging.getLogger("dbsession")

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

DEFAULT_ATTEMPTS = 5
DEFAULT_BASE_DELAY = 0.02
DEFAULT_MAX_DELAY = 1.0


class TransactionalDecorator(Protocol):
    """What ``transactional()`` returns: ``fn(session, *a, **kw)`` becomes ``fn(*a, **kw)``."""

    def __call__(self, fn: Callable[Concatenate[Session, P], R], /) -> Callable[P, R]: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How often to try, and how long to wait between tries.

    The wait after the n-th failure is drawn uniformly from ``[cap / 2, cap]`` with
    ``cap = min(max_delay, base_delay * 2 ** (n - 1))`` seconds. ``idempotent=True``
    says the unit may run twice safely, so a unit whose connection was lost during its
    COMMIT (CommitOutcomeUnknownError: it may have committed) is run again too; by
    default that error propagates. Raises ConfigurationError for ``attempts < 1`` or
    negative delays.
    """

    attempts: int = DEFAULT_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    idempotent: bool = False

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(
                f"attempts must be 1 or more (1 means no retry), got {self.attempts!r}."
            )
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigurationError(
                f"base_delay and max_delay must be zero or more seconds, got "
                f"{self.base_delay!r} and {self.max_delay!r}."
            )

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (jittered)."""
        cap = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return random.uniform(cap / 2, cap)


def run_with_retries(
    open_scope: Callable[[], AbstractContextManager[Session]],
    fn: Callable[[Session], R],
    *,
    policy: RetryPolicy,
    dialect_name: str,
) -> R:
    """Run ``fn(session)`` in ``open_scope()``; on a transient error, roll back and run again.

    Returns what the successful attempt returned. Other errors propagate at once,
    unchanged. Raises RetryExhaustedError, chaining the last error, when every
    attempt failed transiently.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    for attempt in range(1, policy.attempts + 1):
        try:
            with open_scope() as session:
                return fn(session)
        except Exception as error:
            wait = wait_before_retry(error, attempt, policy, dialect_name, name)
            if wait is None:
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


async def run_with_retries_async(
    open_scope: Callable[[], AbstractAsyncContextManager[S]],
    fn: Callable[[S], Awaitable[R]],
    *,
    policy: RetryPolicy,
    dialect_name: str,
) -> R:
    """The async twin of run_with_retries: ``await fn(session)``, and ``asyncio.sleep``
    between attempts (other tasks run meanwhile). Raises what run_with_retries raises."""
    name = getattr(fn, "__qualname__", repr(fn))
    for attempt in range(1, policy.attempts + 1):
        try:
            async with open_scope() as session:
                return await fn(session)
        except Exception as error:
            wait = wait_before_retry(error, attempt, policy, dialect_name, name)
            if wait is None:
                raise
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def wait_before_retry(
    error: Exception, attempt: int, policy: RetryPolicy, dialect_name: str, name: str
) -> float | None:
    """The decision after attempt number ``attempt`` of ``name`` failed with ``error``.

    None: not transient, the caller re-raises it unchanged. Otherwise the seconds to
    wait before the next attempt (the retry is logged at INFO). Raises
    RetryExhaustedError, chaining ``error``, when that was the last attempt.
    """
    reason = retry_reason(error, dialect_name, policy)
    if reason is None:
        return None
    if attempt >= policy.attempts:
        raise RetryExhaustedError(
            f"{name} failed with a transient error ({reason}) on each of "
            f"{attempt} attempts; giving up. Raise attempts=, or reduce contention "
            "on the rows it touches.",
            attempts=attempt,
            last_error=error,
        ) from error
    wait = policy.delay(attempt)
    logger.info(
        "dbsession: %s: %s on attempt %d of %d; retrying in %.3fs",
        name,
        reason,
        attempt,
        policy.attempts,
        wait,
    )
    return wait


def retry_reason(error: Exception, dialect_name: str, policy: RetryPolicy) -> str | None:
    """Why ``error`` is worth another attempt under ``policy``, or None if it is not.

    Transient database errors (``_classify.TRANSIENT``) and a connection lost before the
    commit are; a connection lost during the COMMIT only for ``policy.idempotent``; a
    scope's own time budget running out never is.
    """
    if isinstance(error, ScopeTimeoutError):
        return None
    if isinstance(error, CommitOutcomeUnknownError):
        return "connection lost during COMMIT (idempotent unit)" if policy.idempotent else None
    reason = transient_reason(error, dialect_name)
    if reason is None and isinstance(error, ConnectionLostError):
        return "connection lost before the commit"
    return reason


def retry_decorator(run: Callable[[Callable[[Session], Any]], Any]) -> TransactionalDecorator:
    """Turn ``run(fn)`` (a configured run_in_transaction) into a decorator.

    The decorated ``fn(session, *args, **kwargs)`` is called as ``fn(*args, **kwargs)``.
    """

    def decorate(fn: Callable[Concatenate[Session, P], R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            @functools.wraps(fn)
            def attempt(session: Session) -> R:
                return fn(session, *args, **kwargs)

            return cast(R, run(attempt))

        return wrapper

    return decorate
