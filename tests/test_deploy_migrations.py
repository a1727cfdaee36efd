"""The migration lock through any pooler, scoped to its database, and never waiting for ever."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import migrate_to_base
from deploy_fixtures import Bouncer
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool
from test_migrations import INI, TABLES, tables, upgrade_at_once

from dbsession import migrations
from dbsession.errors import MigrationLockTimeoutError
from dbsession.migrations import _PG_LOCK_KEY

ROUNDS = 2


@pytest.fixture
def pg_database(postgresql_url: URL) -> Iterator[URL]:
    """The test PostgreSQL database, migrated down to base afterwards."""
    yield postgresql_url
    migrate_to_base(postgresql_url)


def _advisory_locks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"  # other runs share the server
                ),
                {"k": _PG_LOCK_KEY},
            )
        )


@pytest.mark.parametrize("route", ["transaction", "session", "direct"])
def test_four_concurrent_upgrades_through_any_pooler_migrate_once_and_leak_no_lock(
    route: str,
    pg_database: URL,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    target = pg_database
    if route != "direct":
        bouncer: Bouncer = request.getfixturevalue(
            "pgbouncer" if route == "transaction" else "pgbouncer_session"
        )
        target = bouncer.url(pg_database)
    direct = create_engine(pg_database, poolclass=NullPool)
    try:
        for _ in range(ROUNDS):
            upgrade_at_once(target, tmp_path)
            assert migrations.current(url=pg_database) == migrations.head(migrations=INI)
            assert TABLES <= tables(pg_database)
            assert _advisory_locks(direct) == 0  # released with its transaction
            migrate_to_base(pg_database)
    finally:
        direct.dispose()


def _hold_lock(conn: Connection, url: URL) -> str:
    """Take the migration lock of ``url``'s database on ``conn``; return what names it."""
    backend = conn.dialect.name
    if backend == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        return f"server process {conn.scalar(text('SELECT pg_backend_pid()'))}"
    name = f"dbsession_migrations:{url.database}"
    assert conn.scalar(text("SELECT GET_LOCK(:n, 0)"), {"n": name}) == 1
    return f"connection {conn.scalar(text('SELECT CONNECTION_ID()'))}"


@pytest.mark.backends("postgresql", "mysql")
def test_a_held_migration_lock_times_out_naming_its_holder(
    db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBSESSION_MIGRATION_LOCK_TIMEOUT", "1")
    holder = create_engine(db_url, poolclass=NullPool)
    try:
        with holder.connect() as conn:
            who = _hold_lock(conn, db_url)
            with pytest.raises(MigrationLockTimeoutError, match=who):
                migrations.upgrade(url=db_url, migrations=INI)
            conn.rollback()
    finally:
        holder.dispose()
    migrations.upgrade(url=db_url, migrations=INI)  # free again: it runs
    assert TABLES <= tables(db_url)


@pytest.mark.backends("mysql")
def test_mysql_lock_of_another_database_does_not_block(db_url: URL) -> None:
    holder = create_engine(db_url, poolclass=NullPool)
    with holder.connect() as conn:
        assert conn.scalar(text("SELECT GET_LOCK('dbsession_migrations:elsewhere', 0)")) == 1
        assert conn.scalar(text("SELECT GET_LOCK('dbsession_migrations', 0)")) == 1  # old name
        migrations.upgrade(url=db_url, migrations=INI)
    holder.dispose()
    assert TABLES <= tables(db_url)


def test_sqlite_uri_urls_take_the_lock_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    database = tmp_path / "app.sqlite3"
    url = URL.create("sqlite", database=f"file:{database}", query={"uri": "true"})
    monkeypatch.setenv("DBSESSION_MIGRATION_LOCK_TIMEOUT", "0.5")
    with open(f"{database}.migrations.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process's migration
        with pytest.raises(MigrationLockTimeoutError, match="app.sqlite3.migrations.lock"):
            migrations.upgrade(url=url, migrations=INI)
        fcntl.flock(handle, fcntl.LOCK_UN)
    migrations.upgrade(url=url, migrations=INI)
    assert TABLES <= tables(url)
