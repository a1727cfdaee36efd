"""The read-only guard: a read-only scope joined to a writing one refuses its writes.

The database cannot make part of a transaction read-only, so dbsession refuses them
itself, at three doors: the ORM flush (changed objects), ORM statements (``insert()``,
``update()``, ``delete()``, text DML), and, below both, every SQL statement sent on the
guarded transaction's connection, which also stops what bypasses the ORM's events
(``bulk_save_objects``, ``bulk_insert_mappings``, ``session.connection().execute()``).
``bulk_insert`` asks ``guarded()`` itself (PostgreSQL's COPY sends no statement).
SQL passes only if it is provably a read (an allow-list, see ``_why_not_a_read``):
what a server-side function does stays unseen, which docs/transactions.md says.

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

# What the guard lets through is an allow-list: statements that are provably reads,
# judged once comments, string literals, quoted identifiers and bind parameter names are
# blanked out (so a keyword in any of them neither passes nor blocks a statement). The
# guard does not know the dialect and the dialects quote differently ('a\' is a whole
# string on PostgreSQL, not on MySQL), so it reads each statement both ways and lets it
# through only if both readings find a read: whatever it blanks, the server ignores too.
_COMMON = r"""
      /\*!\d*(?P<exec>.*?)\*/          # MySQL's executable comment: its text runs
    | (?P<comment>/\*.*?\*/ | --[^\n]*)  # comments
    | `(?:[^`]|``)*`                   # MySQL's quoted identifiers
    | %\(\w+\)s | (?<![:\w]):\w+       # bind parameter names
"""
_NEUTRAL_READINGS = (
    re.compile(  # PostgreSQL: dollar quoting; backslashes escape only in E'...'
        _COMMON
        + r"""
        | \$(?P<tag>\w*)\$.*?\$(?P=tag)\$
        | [eE]'(?:[^'\\]|''|\\.)*' | '(?:[^']|'')*' | "(?:[^"]|"")*"
        """,
        re.DOTALL | re.VERBOSE,
    ),
    re.compile(  # MySQL/MariaDB: backslashes escape in '...' and "..."
        _COMMON
        + r"""
        | '(?:[^'\\]|''|\\.)*' | "(?:[^"\\]|""|\\.)*"
        """,
        re.DOTALL | re.VERBOSE,
    ),
)
#: Statements that read, by their first word(s); anything else writes or may change the
#: outer transaction (COMMIT, BEGIN, LOCK, CALL, DO, COPY, CREATE ... AS, ANALYZE ...).
_QUERY_WORDS = frozenset({"SELECT", "WITH", "VALUES", "TABLE"})
_BOOKKEEPING = re.compile(r"(?:SAVEPOINT|RELEASE|ROLLBACK\s+TO)(?:\s+SAVEPOINT)?\s+\w+$")
#: Inside a query: a data-modifying statement (a CTE in any position), SELECT ... INTO,
#: locking reads, and functions known to write or change the session.
_WRITING_IN_QUERY = re.compile(
    r"""\b(?:INSERT|UPDATE|DELETE|MERGE\s+INTO|INTO|LOCK\s+IN\s+SHARE\s+MODE)\b
    | \bFOR\s+(?:NO\s+KEY\s+|KEY\s+)?SHARE\b
    | \b(?:nextval|setval|set_config|pg_advisory_\w*|pg_try_advisory_\w*|lo_import|lo_export
         |lo_unlink|lo_create|lo_creat|lo_from_bytea|lo_put|lo_truncate|pg_notify|pg_terminate_backend|pg_cancel_backend|dblink_exec|get_lock
         |release_lock|release_all_locks|sys_exec|load_file)\s*\(
    """,
    re.IGNORECASE | re.VERBOSE,
)
#: PRAGMAs that only answer, with an argument (``PRAGMA table_info(t)``); any other
#: PRAGMA with an argument or ``=`` sets something (``PRAGMA user_version = 42``).
_QUERY_PRAGMAS = frozenset(
    {
        "table_info", "table_xinfo", "table_list", "index_info", "index_xinfo", "index_list",
        "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check",
    }
)  # fmt: skip
#: PRAGMAs without an argument that still act (write the database or its files).
_ACTING_PRAGMAS = frozenset({"optimize", "wal_checkpoint", "incremental_vacuum", "shrink_memory"})
#: Session settings a SET may change: time limits and presentation only. Any other
#: (autocommit, TRANSACTION, transaction_read_only, session_replication_role, ROLE,
#: foreign_key_checks, CONSTRAINTS, GLOBAL ...) may change what the outer unit does.
_HARMLESS_SETTINGS = frozenset(
    {
        "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
        "max_statement_time", "max_execution_time", "innodb_lock_wait_timeout",
        "lock_wait_timeout", "application_name", "search_path", "work_mem", "timezone",
        "time_zone", "datestyle", "intervalstyle", "extra_float_digits", "client_encoding",
        "bytea_output", "names", "jit",
    }
)  # fmt: skip
_SET_TARGET = re.compile(r"(?:SESSION\s+|LOCAL\s+)?(?:@@(?:SESSION\.|LOCAL\.)?)?([@\w]+)", re.I)
_SET_STATEMENT = re.compile(r"SET\s+STATEMENT\s+(.*?)\s+FOR\s+(.*)$", re.IGNORECASE | re.DOTALL)


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
    if not getattr(statement, "is_select", False):
        _refuse_if_writing(str(statement))


def _refuse_sql(
    connection: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> tuple[str, Any]:
    _refuse_if_writing(statement)
    return statement, parameters


def _refuse_if_writing(sql: str) -> None:
    why = _why_not_a_read(sql)
    if why is not None:
        raise refusal(why)


def writes(sql: str) -> bool:
    """True unless ``sql`` is provably a read (or SAVEPOINT bookkeeping): see
    ``_why_not_a_read``."""
    return _why_not_a_read(sql) is not None


def _why_not_a_read(sql: str) -> str | None:
    """None if every statement in ``sql`` is a read, else what makes one a write.

    Reads: SELECT / WITH / VALUES / TABLE with no INSERT, UPDATE, DELETE, MERGE, INTO,
    locking clause (FOR UPDATE / SHARE, LOCK IN SHARE MODE) or known writing function
    (nextval, setval, set_config, advisory locks ...) anywhere in them; SHOW, DESCRIBE,
    EXPLAIN without ANALYZE; PRAGMA queries; SET of a time limit or presentation setting
    (and MariaDB's ``SET STATEMENT ... FOR`` a read); SAVEPOINT bookkeeping.
    """
    for reading in _NEUTRAL_READINGS:
        for part in reading.sub(_blank, sql).split(";"):
            statement = part.strip().lstrip("(").strip()
            if statement:
                why = _judge(statement)
                if why is not None:
                    return why
    return None


def _blank(match: re.Match[str]) -> str:
    executable = match.group("exec")
    if executable is not None:
        return f" {executable} "
    return " " if match.group("comment") is not None else " x "


def _judge(statement: str) -> str | None:
    words = statement.split(None, 1)
    first = words[0].upper()
    rest = words[1] if len(words) > 1 else ""
    if first in _QUERY_WORDS:
        found = _WRITING_IN_QUERY.search(statement)
        return None if found is None else f"a query with {' '.join(found.group().split())!r}"
    if first in ("SHOW", "DESCRIBE", "DESC"):
        return None
    if first == "EXPLAIN":
        if re.search(r"\bANALY[SZ]E\b", rest, re.IGNORECASE):
            return "EXPLAIN ANALYZE, which runs the statement"
        return None
    if first == "PRAGMA":
        return _judge_pragma(rest)
    if first == "SET":
        return _judge_set(statement)
    if _BOOKKEEPING.match(statement.upper()):
        return None
    return f"the statement {first!r}"


def _judge_pragma(rest: str) -> str | None:
    name = re.split(r"[\s(=]", rest.strip(), maxsplit=1)[0].split(".")[-1].lower()
    argument = re.search(r"[(=]", rest) is not None
    if (name in _QUERY_PRAGMAS) if argument else (name not in _ACTING_PRAGMAS):
        return None
    return f"PRAGMA {name} with an assignment" if argument else f"PRAGMA {name}"


def _judge_set(statement: str) -> str | None:
    scoped = _SET_STATEMENT.match(statement)
    if scoped is not None:  # MariaDB: SET STATEMENT settings FOR statement
        return _judge_settings(scoped.group(1)) or _judge(scoped.group(2).strip())
    return _judge_settings(statement[3:])


def _judge_settings(assignments: str) -> str | None:
    for assignment in assignments.split(","):
        target = _SET_TARGET.match(assignment.strip())
        name = target.group(1).lower() if target is not None else ""
        if name == "time" and re.match(r"\s*TIME\s+ZONE\b", assignment, re.IGNORECASE):
            continue
        harmless = name in _HARMLESS_SETTINGS or name.startswith("enable_")
        if not (harmless or (name.startswith("@") and not name.startswith("@@"))):
            return f"SET {name or assignment.strip()!r}, which may change the outer transaction"
    return None
