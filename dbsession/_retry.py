"""Running a function in a transaction again when the database reports a transient failure.

Which errors are transient is the table in ``_classify.TRANSIENT``, plus the failures
a failover causes (see ``retry_reason``). The budget is time, not a count. Each attempt
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
from typing import Any, Generic, ParamSpec, TypeVar

from . import observability
from ._classify import connect_transient_reason, transient_reason
from ._errors import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseReadOnlyError,
    DatabaseUnreachableError,
    RetryExhaustedError,
    ScopeTimeoutError,
)
from ._readonly import twin_of
from ._seam import in_greenlet

logger: logging.Logger = logging.getLogger("dbsession")

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

DEFAULT_BUDGET = 15.0
DEFAULT_BASE_DELAY = 0.02
DEFAULT_MAX_DELAY = 1.0


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long ``run_in_transaction`` keeps trying a unit of work, and how long it waits
    between tries: ``retry=RetryPolicy(budget=60.0)`` rides out a failover that takes
    up to a minute (a crashed Patroni leader is replaced after its ``ttl``, 30 s by default).

    ``budget`` is the time in seconds, from the start of the first attempt, after which
    no new attempt starts (the default, 15 s, covers a switchover behind HAProxy).
    ``attempts`` optionally caps the number of tries as well (1 means no retry; None, the
    default, means as many as the budget allows). The wait after the n-th failure is
    drawn uniformly from ``[cap / 2, cap]`` with ``cap = min(max_delay, base_delay *
    2 ** (n - 1))`` seconds, never past the budget. ``idempotent=True`` says the unit may
    run twice safely, so a unit whose connection was lost during its COMMIT
    (CommitOutcomeUnknownError: it may have committed) is run again too; by default that
    error propagates. Raises ConfigurationError for ``attempts < 1``, a negative budget
    or negative delays.
    """

    budget: float = DEFAULT_BUDGET
    attempts: int | None = None
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    idempotent: bool = False

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ConfigurationError(
                f"attempts must be 1 or more (1 means no retry), got {self.attempts!r}."
            )
        if self.budget < 0:
            raise ConfigurationError(
                f"budget must be zero or more seconds (0 means no retry), got {self.budget!r}."
            )
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigurationError(
                f"base_delay and max_delay must be zero or more seconds, got "
                f"{self.base_delay!r} and {self.max_delay!r}."
            )

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (jittered)."""
        cap = min(self.max_delay, self.base_delay * 2 ** min(failures - 1, 64))
        return random.uniform(cap / 2, cap)


def run_with_retries(
    open_scope: Callable[[], AbstractContextManager[S]],
    fn: Callable[[S], R],
    *,
    policy: RetryPolicy | None,
    dialect_name: str,
    name: str | None = None,
) -> R:
    """Run ``fn(session)`` in ``open_scope()``; on a transient error, roll back and run again.

    Returns what the successful attempt returned. Other errors propagate at once,
    unchanged. Raises RetryExhaustedError, chaining the last error, when the attempts
    failed transiently until the policy's budget (or attempts) ran out. With
    ``policy=None`` (a scope joined to an outer one, whose own retry loop must run the
    whole unit again) there is one attempt and no wrapping. ``name`` is the user's
    function the log lines and errors name (default: ``fn``'s own name).
    """
    if policy is None:
        with open_scope() as session:
            return fn(session)
    name = name or unit_name(fn)
    deadline = time.monotonic() + policy.budget
    attempt = 0
    used: S | None = None
    while True:
        attempt += 1
        used = None
        try:
            with observability._attempt(attempt), open_scope() as session:
                used = session
                return fn(session)
        except Exception as error:
            wait = wait_before_retry(error, attempt, policy, dialect_name, name, deadline)
            if wait is None:
                raise
            forget_demoted_primary(error, used)
            time.sleep(wait)


async def run_with_retries_async(
    open_scope: Callable[[], AbstractAsyncContextManager[S]],
    fn: Callable[[S], Awaitable[R]],
    *,
    policy: RetryPolicy | None,
    dialect_name: str,
    name: str | None = None,
) -> R:
    """The async twin of run_with_retries: ``await fn(session)``, and ``asyncio.sleep``
    between attempts (other tasks run meanwhile). Raises what run_with_retries raises."""
    if policy is None:
        async with open_scope() as session:
            return await fn(session)
    name = name or unit_name(fn)
    deadline = time.monotonic() + policy.budget
    attempt = 0
    used: S | None = None
    while True:
        attempt += 1
        used = None
        try:
            with observability._attempt(attempt):
                async with open_scope() as session:
                    used = session
                    return await fn(session)
        except Exception as error:
            wait = wait_before_retry(error, attempt, policy, dialect_name, name, deadline)
            if wait is None:
                raise
            await in_greenlet(forget_demoted_primary, error, used)  # async pools await
            await asyncio.sleep(wait)


def unit_name(fn: object) -> str:
    """How log lines and errors name the user's function: its qualified name without the
    ``<locals>`` of the function it was defined in (``transfer``, ``Bank.transfer``)."""
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        return repr(fn)
    return qualname.rpartition("<locals>.")[2]


def wait_before_retry(
    error: Exception,
    attempt: int,
    policy: RetryPolicy,
    dialect_name: str,
    name: str,
    deadline: float,
) -> float | None:
    """The decision after attempt number ``attempt`` of ``name`` failed with ``error``.

    None: not transient, the caller re-raises it unchanged. Otherwise the seconds to
    wait before the next attempt (the retry is logged at INFO). Raises
    RetryExhaustedError, chaining ``error``, when that was the last attempt: the
    policy's ``attempts`` are used up or its budget (``deadline``, a ``time.monotonic()``
    instant) has passed.
    """
    reason = retry_reason(error, dialect_name, policy)
    if reason is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0 or (policy.attempts is not None and attempt >= policy.attempts):
        spent = policy.budget - left
        raise RetryExhaustedError(
            f"{name} failed with a transient error ({reason}) on each of "
            f"{attempt} attempts in {spent:.1f}s; giving up. Pass "
            "retry=RetryPolicy(budget=...) with more seconds (a failover can take "
            "30 s or more), or reduce contention on the rows it touches.",
            attempts=attempt,
            last_error=error,
        ) from error
    wait = min(policy.delay(attempt), left)
    observability._retried(reason, dialect_name)
    logger.info(
        "dbsession: %s: %s on attempt %d (%.1fs of the %gs budget left); retrying in %.3fs",
        name,
        reason,
        attempt,
        left,
        policy.budget,
        wait,
    )
    return wait


def retry_reason(error: Exception, dialect_name: str, policy: RetryPolicy) -> str | None:
    """Why ``error`` is worth another attempt under ``policy``, or None if it is not.

    Transient database errors (``_classify.TRANSIENT``, anywhere in the chain: conflicts,
    a Galera node outside the primary component), a connection lost before the commit,
    a server that refused the connection but may take it soon (down, restarting, a
    failover under way), and a primary demoted under the pool (its refusal of a write
    in a writing scope) are; a connection lost during the COMMIT only for
    ``policy.idempotent``; a scope's own time budget running out never is.
    """
    if isinstance(error, ScopeTimeoutError):
        return None
    if isinstance(error, CommitOutcomeUnknownError):
        return "connection lost during COMMIT (idempotent unit)" if policy.idempotent else None
    reason = _transient_in_chain(error, dialect_name)
    if reason is not None:
        return reason
    if isinstance(error, ConnectionLostError):
        return "connection lost before the commit"
    if isinstance(error, DatabaseUnreachableError):
        clue = connect_transient_reason(str(error))
        return None if clue is None else f"cannot connect yet ({clue})"
    if isinstance(error, DatabaseReadOnlyError):
        return "the server is read-only (a demoted primary?); reconnecting"
    return None


def forget_demoted_primary(error: BaseException, session: object) -> None:
    """After a write refused by a read-only server in a writing scope, close the idle
    connections of the engine the session used and of its read-only twin: they lead to
    the demoted primary (whose reads may be stale, or lost in the failover), and the next
    connect (through HAProxy or a multi-host URL) finds the new one."""
    if not isinstance(error, DatabaseReadOnlyError) or session is None:
        return
    get_bind = getattr(session, "get_bind", None)
    if get_bind is None:
        return
    try:
        bind = get_bind()
        for engine in (bind, twin_of(bind)):
            if engine is not None:
                engine.pool.dispose()
    except Exception:  # a bind without a pool of its own: nothing to forget
        logger.debug("dbsession: emptying the pool after a read-only refusal failed", exc_info=True)


def _transient_in_chain(error: BaseException, dialect_name: str) -> str | None:
    """The transient reason of ``error`` or of any exception in its ``__cause__`` /
    ``__context__`` chain (a deadlock that lost a savepoint surfaces as the failed
    savepoint rollback, or as TransactionAbortedError at commit)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = transient_reason(current, dialect_name)
        if reason is not None:
            return reason
        current = current.__cause__ or current.__context__
    return None


class UnitOfWorkFunction(Generic[R]):
    """``fn(session, *args, **kwargs)`` called as ``fn(*args, **kwargs)``, each call run
    by ``run`` (a configured run_in_transaction, or a scope) with the session it opens.

    Works on plain functions and on methods (``fn(self, session, ...)`` is called as
    ``obj.fn(...)``): it binds like a function when looked up on an instance.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        run: Callable[[Callable[[Any], Any]], R],
        instance: object = None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._run = run
        self._instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        fn, instance = self._fn, self._instance
        if instance is None:
            return self._run(lambda session: fn(session, *args, **kwargs))
        return self._run(lambda session: fn(instance, session, *args, **kwargs))

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        return UnitOfWorkFunction(self._fn, self._run, instance)

    def __repr__(self) -> str:
        return f"<unit of work {self._fn.__qualname__}>"
