"""``dbsession upgrade --rehearse`` (PostgreSQL): what each pending statement would cost.

``migrations.rehearse`` builds a scratch database on the same server (the revisions up to the
database's current one, run again, then a sample of each table's rows), and runs the pending
revisions there through :class:`Recorder`, a ``do_execute`` hook that runs each statement in a
transaction of its own and looks at the locks its session holds and at each table's
``relfilenode`` before and after it: the locks are the ones the statement took (held, in a
real upgrade, until the migration commits), and a changed ``relfilenode`` means the table
was rewritten. ``CONCURRENTLY`` statements are run but not reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ._concurrently import is_concurrent

#: Statements the migration machinery sends, not the revisions' work.
_NOT_RECORDED = frozenset(
    {"SELECT", "SHOW", "SET", "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"}
)
_LOCKS = (
    "SELECT c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE l.pid = pg_backend_pid() "
    "AND l.granted AND l.locktype = 'relation' AND c.relkind IN ('r', 'p', 'm') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
)
_FILES = (
    "SELECT c.oid, c.relname, c.relfilenode FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
)


@dataclass(frozen=True)
class RehearsedStatement:
    """One statement of the rehearsal: how long it ran, the table locks it took (held until
    the migration's transaction ends), and the tables it rewrote."""

    statement: str
    seconds: float
    locks: tuple[str, ...]
    rewritten: tuple[str, ...]

    def __str__(self) -> str:
        flat = " ".join(self.statement.split())
        flat = flat if len(flat) <= 70 else flat[:67] + "..."
        locks = ", ".join(self.locks) or "no table lock"
        rewrite = f"; REWROTE {', '.join(self.rewritten)}" if self.rewritten else ""
        return f"{self.seconds * 1000:8.1f} ms  {flat}\n             {locks}{rewrite}"


def _mode(mode: str) -> str:
    """``AccessExclusiveLock`` -> ``ACCESS EXCLUSIVE``."""
    words = "".join(f" {c}" if c.isupper() else c for c in mode.removesuffix("Lock")).split()
    return " ".join(words).upper()


class Recorder:
    """The ``do_execute`` hook of the rehearsal (statements run as SQLAlchemy would)."""

    def __init__(self) -> None:
        self.statements: list[RehearsedStatement] = []

    def __call__(self, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        head = (statement.split(None, 1) or [""])[0].upper()
        if is_concurrent(statement) or head in _NOT_RECORDED or "alembic_version" in statement:
            return False
        # Each statement in a transaction of its own (the copy is private): the locks its
        # session then holds are the ones this statement took.
        cursor.connection.commit()
        probe = cursor.connection.cursor()
        try:
            files, locks = self._look(probe)
            started = time.perf_counter()
            cursor.execute(statement, parameters)
            took = time.perf_counter() - started
            files_after, locks_after = self._look(probe)
        finally:
            probe.close()
        taken = sorted(f"{_mode(mode)} on {name}" for name, mode in locks_after - locks)
        rewritten = sorted(
            name
            for oid, (name, node) in files_after.items()
            if oid in files and files[oid][1] != node
        )
        self.statements.append(RehearsedStatement(statement, took, tuple(taken), tuple(rewritten)))
        return True

    @staticmethod
    def _look(probe: Any) -> tuple[dict[int, tuple[str, int]], set[tuple[str, str]]]:
        probe.execute(_FILES)
        files = {int(oid): (str(name), int(node)) for oid, name, node in probe.fetchall()}
        probe.execute(_LOCKS)
        return files, {(str(name), str(mode)) for name, mode in probe.fetchall()}
