"""Errors that say what really happened: read-only where it is really read-only, bad option
values named when configured, driver option errors named at connect, hints naming the setting
that was actually used."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from dbsession import (
    ConfigurationError,
    DatabaseReadOnlyError,
    DatabaseUnreachableError,
    DbSessionFactory,
    ReadOnlyError,
    migrations,
)
from dbsession.cli import main as cli
from dbsession.errors import InvalidURLError, SQLitePathError

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
INI = ROOT / "alembic.ini"


def write(factory: DbSessionFactory, *, readonly: bool = False) -> None:
    try:
        with factory.session_scope(readonly=readonly) as session:
            session.execute(text("INSERT INTO marks (id) VALUES (1)"))
    finally:
        factory.dispose()


def _read_only_session(url: URL) -> DbSessionFactory:
    """A factory whose every connection is read-only, as on a hot standby or read-only role."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        return DbSessionFactory(
            url.set(database=f"file:{url.database}").update_query_dict(
                {"mode": "ro", "uri": "true"}
            )
        )
    if backend == "postgresql":
        return DbSessionFactory(
            url.update_query_dict({"options": "-c default_transaction_read_only=on"})
        )
    return DbSessionFactory(url, connect_args={"init_command": "SET SESSION TRANSACTION READ ONLY"})


@pytest.fixture
def marks_table(backend_url: URL) -> Any:
    factory = DbSessionFactory(backend_url)
    with factory.session_scope() as session:
        session.execute(text("CREATE TABLE marks (id INTEGER PRIMARY KEY)"))
    yield backend_url
    with factory.session_scope() as session:
        session.execute(text("DROP TABLE marks"))
    factory.dispose()


def test_a_read_only_database_in_a_writing_scope_names_the_real_cause(marks_table: URL) -> None:
    backend = marks_table.get_backend_name()
    expected = SQLitePathError if backend == "sqlite" else DatabaseReadOnlyError
    with pytest.raises(expected) as caught:
        write(_read_only_session(marks_table))
    assert not isinstance(caught.value, ReadOnlyError)
    assert "session_scope(readonly=True)" not in str(caught.value)
    with pytest.raises(ReadOnlyError, match="readonly=True"):
        write(DbSessionFactory(marks_table), readonly=True)


def test_an_existing_sqlite_file_in_a_folder_that_is_not_writable(tmp_path: Path) -> None:
    """WAL creates -wal and -shm files beside the database: its folder must be writable."""
    if os.geteuid() == 0:  # root writes anywhere on disk; /proc refuses even root
        existing = Path("/proc/version")
    else:
        folder = tmp_path / "readonly"
        folder.mkdir()
        existing = folder / "app.sqlite3"
        existing.write_bytes(b"")
        folder.chmod(0o555)
    assert existing.exists()
    with pytest.raises(SQLitePathError, match="is not writable"):
        DbSessionFactory(f"sqlite:///{existing}").engine  # noqa: B018


def test_an_async_driver_url_on_the_sync_side(tmp_path: Path) -> None:
    """Migrations (Python, CLI) use the sync twin; a sync factory names the async one."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.sqlite3'}"
    with pytest.raises(ConfigurationError, match="AsyncDbSessionFactory"):
        DbSessionFactory(url)
    migrations.upgrade(url=url, migrations=INI)
    assert migrations.current(url=url) == migrations.head(migrations=INI)
    assert cli(["--url", url, "--migrations", str(INI), "downgrade", "base"]) == 0
    assert migrations.current(url=url) is None
    alembic = [sys.executable, "-m", "alembic", "-c", str(INI), "-x", f"url={url}", "upgrade"]
    result = subprocess.run([*alembic, "head"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert migrations.current(url=url) == migrations.head(migrations=INI)


def test_the_plugin_migrates_an_async_driver_url(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """docs/testing.md: --dbsession-url may name an async driver, with migrations too."""
    pytester.makefile(
        ".ini",
        alembic=f"[alembic]\nscript_location = {ROOT / 'dbsession' / 'example' / 'migrations'}\n",
    )
    pytester.makepyfile(
        test_inner=textwrap.dedent(
            """
            from sqlalchemy import text

            def test_migrated(db_session):
                assert db_session.execute(text("SELECT COUNT(*) FROM customer")).scalar() == 0
            """
        )
    )
    url = f"sqlite+aiosqlite:///{tmp_path / 'plugin.sqlite3'}"
    pytester.runpytest_subprocess(f"--dbsession-url={url}").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"sqlite_busy_timeout": math.nan}, "sqlite_busy_timeout"),
        ({"sqlite_busy_timeout": math.inf}, "sqlite_busy_timeout"),
        ({"sqlite_busy_timeout": -1}, "sqlite_busy_timeout"),
        ({"sqlite_busy_timeout": 1e300}, "sqlite_busy_timeout"),
        ({"sqlite_busy_timeout": "5"}, "sqlite_busy_timeout"),
        ({"expire_on_commit": "no"}, "expire_on_commit"),
        ({"connect_args": "x"}, "connect_args"),
    ],
)
def test_bad_option_values_are_named_at_global_init(
    options: dict[str, Any], named: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        DbSessionFactory.global_init(f"sqlite:///{tmp_path / 'x.db'}", **options)
    with pytest.raises(ConfigurationError, match=named):
        DbSessionFactory(f"sqlite:///{tmp_path / 'x.db'}", **options)


def test_a_path_is_a_sqlite_file_bytes_are_refused_and_home_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = DbSessionFactory(tmp_path / "app.sqlite3")  # type: ignore[arg-type]  # lead: URLLike
    assert factory.url.database == str(tmp_path / "app.sqlite3")
    factory.dispose()
    with pytest.raises(InvalidURLError, match="not bytes"):
        DbSessionFactory(b"sqlite://")  # type: ignore[arg-type]
    monkeypatch.setenv("HOME", str(tmp_path))
    factory = DbSessionFactory("sqlite:///~/home.sqlite3")
    assert factory.url.database == str(tmp_path / "home.sqlite3")
    with factory.engine.connect():
        pass
    factory.dispose()
    assert (tmp_path / "home.sqlite3").exists()
    assert not Path("~").exists()


DRIVER_OPTIONS = [
    ("postgresql", "?connect_timeout=abc", {}, "connect_timeout"),
    ("postgresql", "?bogus=1", {}, "bogus"),
    ("postgresql", "", {"connect_args": {"bogus": 1}}, "bogus"),
    ("mysql", "?charset=bogus", {}, "charset"),
    ("mysql", "?bogus=1", {}, "bogus"),
    ("mysql", "?connect_timeout=abc", {}, "connect_timeout"),
    ("sqlite", "?bogus=1", {}, "bogus"),
]


@pytest.mark.parametrize(("backend", "query", "options", "named"), DRIVER_OPTIONS)
def test_driver_option_errors_are_configuration_errors_naming_the_option(
    backend: str,
    query: str,
    options: dict[str, Any],
    named: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    if backend == "sqlite":
        base = f"sqlite:///{tmp_path / 'x.db'}"
    else:
        server: URL = request.getfixturevalue(f"{backend}_url")
        base = server.render_as_string(hide_password=False)
    factory = DbSessionFactory(base + query, **options) if backend != "sqlite" else None
    with pytest.raises(ConfigurationError, match=named) as caught:
        factory = factory or DbSessionFactory(base + query, **options)
        try:
            with factory.engine.connect():
                pass
        finally:
            factory.dispose()
    assert not isinstance(caught.value, DatabaseUnreachableError)


def test_hints_name_the_setting_actually_used(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = "postgresql://postgres@127.0.0.1:1/test"
    monkeypatch.setenv("DATABASE_URL", closed)
    for factory, source in (
        (DbSessionFactory(), "(from DATABASE_URL)"),
        (DbSessionFactory(closed), "(from argument)"),
    ):
        with pytest.raises(DatabaseUnreachableError, match=source):
            factory.engine.connect()
        factory.dispose()
    replica = DbSessionFactory("sqlite://", replica_url=closed)
    with pytest.raises(DatabaseUnreachableError, match=r"\(from replica_url\)"):
        assert replica.replica_engine is not None
        replica.replica_engine.connect()
    replica.dispose()


def test_a_dbsession_url_naming_a_missing_database_is_one_clear_error(
    pytester: pytest.Pytester, postgresql_url: URL
) -> None:
    pytester.makepyfile(
        test_inner="""
        def test_one(db_session):
            pass

        def test_two(db_session):
            pass
        """
    )
    missing = postgresql_url.set(database="dbsession_no_such_database")
    result = pytester.runpytest_subprocess(
        f"--dbsession-url={missing.render_as_string(hide_password=False)}",
        "--dbsession-schema=create_all",
    )
    result.assert_outcomes(errors=2)
    output = result.stdout.str()
    assert 'database "dbsession_no_such_database" does not exist' in output
    assert "(from --dbsession-url)" in output
    assert "Traceback" not in output
    assert len(output.splitlines()) < 40, output
