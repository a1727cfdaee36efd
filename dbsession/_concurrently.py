"""PostgreSQL ``CONCURRENTLY`` statements inside a migration, run as written.

``CREATE INDEX CONCURRENTLY`` (what ``op.create_index(..., postgresql_concurrently=True)``
emits), ``DROP INDEX CONCURRENTLY``, ``REINDEX ... CONCURRENTLY`` and ``DETACH PARTITION
... CONCURRENTLY`` refuse to run inside a transaction block, and a dbsession migration runs
in one (the migration lock is a transaction-level advisory lock). The runner hands each
such statement to :func:`run_outside_transaction`, which

1. takes the migration lock at session level too, so it holds across the commit;
2. commits what the migration did so far (as Alembic's ``autocommit_block`` would);
3. for ``CREATE INDEX CONCURRENTLY``: drops an INVALID index of the same name, the left-over
   of a concurrent build that failed (then builds it again);
4. runs the statement in autocommit, with no lock wait: these statements take no lock that
   stops reads or writes, so waiting for old transactions harms no one;
5. opens the next transaction, takes the transaction-level lock again, sets the lock wait
   again, and lets go of the session-level lock.

The revision's statements before the ``CONCURRENTLY`` one are committed at step 2: a
revision that fails after it runs them again on the next upgrade, so keep such a statement
in a revision of its own (``dbsession lint`` says so, rule DBS112).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

_CONCURRENT = re.compile(
    r"\s*(CREATE\s+(UNIQUE\s+)?INDEX\s+CONCURRENTLY|DROP\s+INDEX\s+CONCURRENTLY"
    r"|REINDEX\b.*\bCONCURRENTLY|ALTER\s+TABLE\b.*\bDETACH\s+PARTITION\b.*\bCONCURRENTLY)\b",
    re.IGNORECASE | re.DOTALL,
)
_IDENTIFIER = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_CREATED_INDEX = re.compile(
    rf"\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    rf"(?P<name>{_IDENTIFIER}(?:\s*\.\s*{_IDENTIFIER})?)\s+ON\b",
    re.IGNORECASE,
)
logger: logging.Logger = logging.getLogger("dbsession")


def is_concurrent(statement: str) -> bool:
    """True for a PostgreSQL statement that cannot run inside a transaction block because
    it works ``CONCURRENTLY``."""
    return _CONCURRENT.match(statement) is not None


def created_index(statement: str) -> str | None:
    """The (possibly qualified, quoted) name a ``CREATE INDEX CONCURRENTLY`` builds."""
    found = _CREATED_INDEX.match(statement)
    return found.group("name") if found else None


def run_outside_transaction(
    dbapi_connection: Any,
    cursor: Any,
    statement: str,
    parameters: Any,
    *,
    lock_key: int,
    lock_timeout: str,
) -> None:
    """Run ``statement`` in autocommit between two transactions of the migration, holding
    the migration lock throughout (see the module docstring). Raises the driver's error."""
    if getattr(dbapi_connection, "autocommit", False):  # already outside (autocommit_block)
        _execute(cursor, statement, parameters)
        return
    cursor.execute(f"SELECT pg_advisory_lock({int(lock_key)})")
    dbapi_connection.commit()
    dbapi_connection.autocommit = True
    try:
        name = created_index(statement)
        if name is not None:
            _drop_invalid_leftover(cursor, name)
        _execute(cursor, statement, parameters)
    finally:
        dbapi_connection.autocommit = False
        cursor.execute(f"SELECT pg_advisory_xact_lock({int(lock_key)})")
        cursor.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
        cursor.execute(f"SELECT pg_advisory_unlock({int(lock_key)})")


def _execute(cursor: Any, statement: str, parameters: Any) -> None:
    cursor.execute(statement, parameters)  # as SQLAlchemy's do_execute would


def _drop_invalid_leftover(cursor: Any, name: str) -> None:
    cursor.execute(
        "SELECT NOT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)", (name,)
    )
    row = cursor.fetchone()
    if row is not None and row[0]:
        logger.warning(
            "dbsession: index %s is INVALID (a concurrent build of it failed before); "
            "dropping it concurrently and building it again",
            name,
        )
        cursor.execute(f"DROP INDEX CONCURRENTLY {name}")


def commit_point(connection: Connection, *, lock_key: int) -> None:
    """Commit what the migration did so far on ``connection`` and go on in a new transaction,
    keeping the migration lock and the lock wait (PostgreSQL: the lock is held at session
    level across the commit; MySQL/MariaDB's is a session lock already). SQLite: nothing.

    The COMMIT is sent as a statement, under SQLAlchemy's (and Alembic's) own transaction,
    which carries on into the next server transaction and is committed at the end.
    """
    backend = connection.dialect.name
    if backend == "postgresql":
        key = int(lock_key)
        wait = connection.exec_driver_sql("SELECT current_setting('lock_timeout')").scalar()
        connection.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
        connection.exec_driver_sql("COMMIT")
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({key})")
        connection.execute(text("SELECT set_config('lock_timeout', :wait, true)"), {"wait": wait})
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
    elif backend in ("mysql", "mariadb"):
        connection.exec_driver_sql("COMMIT")
