"""The read-only guard: a read-only scope joined to a writing one refuses its writes.

The database cannot make part of a transaction read-only, so dbsession refuses them
itself, at three doors: the ORM flush (changed objects), ORM statements (``insert()``,
``update()``, ``delete()``, text DML), and, below both, every SQL statement sent on the
guarded transaction's connection, which also stops what bypasses the ORM's events
(``bulk_save_objects``, ``bulk_insert_mappings``, ``session.connection().execute()``).
``bulk_insert`` asks ``guarded()`` itself (PostgreSQL's COPY sends no statement).

Every listener is the session's (or its connection's) own and only while it is
guarded: on the Session class or the engine, every flush and statement of every scope
would go through them (measured: +3.5% instructions per one-query unit of work).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState, Session

from ._errors import ReadOnlyError

#: ``session.info`` key: how many guards the session is under.
GUARD_KEY = "dbsession_readonly_guard"
_CONNECTION_KEY = "dbsession_readonly_guard_connection"
#: First words of the statements a guarded transaction may send: reads, and the
#: SAVEPOINT bookkeeping of scopes nested inside the read-only one.
_READING_WORDS = frozenset(
    {
        "SELECT", "WITH", "SHOW", "EXPLAIN", "VALUES", "TABLE", "DESCRIBE",
        "SAVEPOINT", "RELEASE", "ROLLBACK", "SET", "PRAGMA",
    }
)  # fmt: skip
_LEADING = re.compile(r"(?:\s+|/\*.*?\*/|--[^\n]*(?:\n|$)|\()*", re.DOTALL)
_DML = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE|REPLACE)\b", re.IGNORECASE)


def guard(session: Session, connection: Connection | None = None) -> None:
    """Refuse the writes of ``session`` (ReadOnlyError) until ``unguard``; guards nest.
    ``connection``: the connection of the guarded transaction, whose SQL is checked too."""
    count = session.info.get(GUARD_KEY, 0)
    session.info[GUARD_KEY] = count + 1
    if count:
        return
    event.listen(session, "before_flush", _refuse_flush)
    event.listen(session, "do_orm_execute", _refuse_orm_statement)
    if connection is not None:
        session.info[_CONNECTION_KEY] = connection
        event.listen(connection, "before_cursor_execute", _refuse_sql, retval=True)


def unguard(session: Session) -> None:
    """Undo one ``guard`` of ``session``."""
    count = session.info[GUARD_KEY] - 1
    session.info[GUARD_KEY] = count
    if count:
        return
    event.remove(session, "before_flush", _refuse_flush)
    event.remove(session, "do_orm_execute", _refuse_orm_statement)
    connection = session.info.pop(_CONNECTION_KEY, None)
    if connection is not None:
        event.remove(connection, "before_cursor_execute", _refuse_sql)


def guarded(session: Session) -> bool:
    """True if ``session`` is under a guard (its writes must be refused)."""
    return bool(session.info.get(GUARD_KEY))


def refusal(what: str) -> ReadOnlyError:
    """The error for a write (``what``) refused by the guard."""
    return ReadOnlyError(
        f"A write ({what}) was refused inside session_scope(readonly=True), which joined "
        "the writing scope around it and so cannot be made read-only by the database. "
        "Do the write outside the read-only block."
    )


def _refuse_flush(session: Session, flush_context: Any, instances: Any) -> None:
    if session.new or session.deleted or any(session.is_modified(o) for o in session.dirty):
        raise refusal("a flush of changed ORM objects")


def _refuse_orm_statement(state: ORMExecuteState) -> None:
    statement = state.statement
    if getattr(statement, "is_dml", False):
        verb = next(
            (v for v in ("insert", "update", "delete") if getattr(statement, f"is_{v}", False)),
            "dml",
        )
        raise refusal(f"the statement {verb.upper()!r}")
    if not getattr(statement, "is_select", False) and writes(str(statement)):
        raise refusal(f"the statement {_first_word(str(statement))!r}")


def _refuse_sql(
    connection: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> tuple[str, Any]:
    if writes(statement):
        raise refusal(f"the statement {_first_word(statement)!r}")
    return statement, parameters


def writes(sql: str) -> bool:
    """True unless ``sql`` is a read (or SAVEPOINT bookkeeping), judged by its first word
    (a ``WITH`` that contains INSERT, UPDATE, DELETE, MERGE or REPLACE writes)."""
    word = _first_word(sql)
    if word == "WITH":
        return _DML.search(sql) is not None
    return word not in _READING_WORDS


def _first_word(sql: str) -> str:
    words = sql[_LEADING.match(sql).end() :].split(None, 1)  # type: ignore[union-attr]
    return words[0].upper().rstrip("(;") if words else ""
