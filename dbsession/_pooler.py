"""Safe behind a connection pooler: server-side prepared statements, and connections lost
under a transaction.

Prepared statements: psycopg 3 prepares a statement on the server after its fifth
execution (``prepare_threshold=5``) and later runs it by name. Behind a pooler in
transaction mode (PgBouncer before 1.21 or without ``max_prepared_statements``, most
managed "transaction poolers") the next transaction may run on another server session,
where that name is unknown (26000), already taken (42P05), or names another statement:
``session.get(Account, 1)`` then returns a row of another table and an UPDATE lands in
another column. So dbsession turns them off (``prepare_threshold=None``) unless the
factory is told there is no transaction pooler: ``pooler="none"`` (a direct connection)
or ``pooler="session"``. Measured on a direct connection (ORM primary-key SELECT, one
session, loopback): about 215 us a query with them, 235-250 us without; less than the
cost of one wrong row.

Lost connections: a server session killed under PgBouncer can surface as an
``InternalError`` ("received 2 results from command 'COMMIT'") or a protocol violation
(08P01) instead of the usual "server closed the connection". All of them are treated as
disconnects (the pool drops the connection) and raised as ConnectionLostError, or as
CommitOutcomeUnknownError when the COMMIT itself was in flight: the transaction may have
committed, and only the application can tell whether running it again is safe.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, ExceptionContext

from ._classify import backend_of, error_code
from ._config import first_line
from ._errors import CommitOutcomeUnknownError, ConnectionLostError
from ._seam import Method, set_hook
from ._timeouts import driver_name, overdue_error

_IN_COMMIT = "dbsession_in_commit"
_PROTOCOL_CODES = frozenset({"08P01", "08006", "08003", "08000", "57P01", "57P02", "57P03"})
_LOST_CLUES = (
    "server closed the connection",
    "consuming input failed",
    "terminating connection",
    "the connection is closed",
    "lost connection",
    "server has gone away",
    "connection reset",
    "broken pipe",
)


def prepared_statement_args(url: URL, pooler: str | None) -> dict[str, Any]:
    """psycopg's ``prepare_threshold``: off unless ``pooler`` says no transaction pooler."""
    if driver_name(url) != "psycopg" or pooler in ("none", "session"):
        return {}
    return {"prepare_threshold": None}


def is_lost_connection(error: BaseException, dialect_name: str) -> bool:
    """True if the driver's ``error`` means the connection under the transaction is gone."""
    backend = backend_of(dialect_name)
    message = str(error).lower()
    if backend == "postgresql":
        if error_code(error, backend) in _PROTOCOL_CODES:
            return True
        if "received" in message and "results from command" in message:
            return True
    elif backend == "mysql" and error_code(error, backend) in (2006, 2013, 2014, 2055):
        return True
    return any(clue in message for clue in _LOST_CLUES)


def install_connection_loss(engine: Engine, describe: str) -> None:
    """Raise ConnectionLostError / CommitOutcomeUnknownError for a connection lost under a
    transaction on ``engine`` (``describe``: which server, masked, for the message).

    The dialect's ``do_commit`` marks the error a COMMIT raised as the COMMIT's (an
    attribute of that exception: nothing stays on the connection to mislabel a later
    error or keep the failed unit alive), and the error handler below reads it. A hook
    of the dialect's method (``_seam``) rather than a commit listener, which would send
    every statement of the engine through SQLAlchemy's event dispatch; a COMMIT that
    succeeds costs one call. Were SQLAlchemy to stop calling ``do_commit``, a connection
    lost during COMMIT would be retried as lost before it: ``tests/test_seam.py`` fails
    first.
    """

    def mark_failure(commit: Method) -> Method:
        def do_commit(dbapi_connection: Any) -> None:
            try:
                commit(dbapi_connection)
            except BaseException as error:
                setattr(error, _IN_COMMIT, True)
                raise

        return do_commit

    set_hook(engine, "do_commit", "commit_error", mark_failure)

    @event.listens_for(engine, "handle_error")
    def lost(context: ExceptionContext) -> BaseException | None:
        if context.connection is None or context.is_pre_ping:
            return None
        original = context.original_exception
        in_commit = getattr(original, _IN_COMMIT, False)
        if not isinstance(original, Exception) or not (
            context.is_disconnect or is_lost_connection(original, context.dialect.name)
        ):
            return None
        context.is_disconnect = True
        why = f"({context.dialect.name}: {first_line(original, engine.url)})"
        if in_commit:
            return CommitOutcomeUnknownError(
                f"The connection to {describe} was lost during COMMIT {why}: the commit's "
                "outcome is unknown, the transaction may or may not have been applied. Check "
                "before running it again; run_in_transaction retries it only with "
                "RetryPolicy(idempotent=True).",
                statement=context.statement,
                params=context.parameters,
                orig=original,
                connection_invalidated=True,
            )
        overdue = overdue_error(context, describe)  # a deadline passed (a frozen server)
        if overdue is not None:
            return overdue
        return ConnectionLostError(
            f"The connection to {describe} was lost {why}; the transaction was not "
            "committed. The pool opens a new connection on the next use; "
            "run_in_transaction runs the unit again.",
            statement=context.statement,
            params=context.parameters,
            orig=original,
            connection_invalidated=True,
        )
