"""Helpers for tests that reach into the servers: server-side connection ids, killing them."""

from __future__ import annotations

import time

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session


def server_pid(conn: Connection | Session) -> int:
    """The server's id for this connection: PostgreSQL backend pid or MariaDB connection id."""
    dialect = (conn.get_bind() if isinstance(conn, Session) else conn).dialect
    sql = "SELECT pg_backend_pid()" if dialect.name == "postgresql" else "SELECT CONNECTION_ID()"
    return int(conn.execute(text(sql)).scalar_one())


def kill(admin: Engine, pids: list[int]) -> None:
    """End these server sessions from another connection and wait until they are gone."""
    postgres = admin.dialect.name == "postgresql"
    with admin.connect() as conn:
        for pid in pids:
            if postgres:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            else:
                conn.execute(text(f"KILL {int(pid)}"))
    listing = (
        "SELECT pid FROM pg_stat_activity"
        if postgres
        else "SELECT ID FROM information_schema.PROCESSLIST"
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with admin.connect() as conn:
            if not set(pids) & set(conn.scalars(text(listing))):
                return
        time.sleep(0.05)
    raise AssertionError(f"server sessions {pids} still alive 10 s after being killed")


def is_killed_connection_error(error: DBAPIError) -> bool:
    """True if ``error`` says, in the server's words, that its connection was ended under
    it, and SQLAlchemy invalidated the connection (it will not go back to the pool)."""
    clues = ("terminating connection due to administrator command", "Lost connection")
    return error.connection_invalidated and any(clue in str(error) for clue in clues)


def suppliers(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(text("SELECT name FROM supplier")))


def checked_out(engine: Engine) -> int:
    """How many connections of ``engine``'s pool are checked out now."""
    count: int = engine.pool.checkedout()  # type: ignore[attr-defined]
    return count
