"""Every bad input gets a named error that says how to fix it, and never a password."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

import dbsession
from dbsession import (
    ConfigurationError,
    DatabaseReadOnlyError,
    DatabaseUnreachableError,
    DbSessionError,
    DbSessionFactory,
    NoActiveScopeError,
    ReadOnlyError,
    RetryExhaustedError,
)
from dbsession.errors import (
    AlreadyInitializedError,
    InvalidURLError,
    MissingDriverError,
    ScopeError,
    SQLitePathError,
    UnknownDialectError,
    UnsupportedIsolationLevelError,
)

MARKER = "Pw-MARKER-7f3a"


def connect(url: str) -> None:
    factory = DbSessionFactory(url, connect_args={"connect_timeout": 3})
    try:
        with factory.session_scope() as session:
            session.execute(text("SELECT 1"))
    finally:
        factory.dispose()


def open_sqlite(path: Path) -> None:
    DbSessionFactory(f"sqlite:///{path}").engine.dispose()


def test_every_error_is_a_dbsession_error() -> None:
    for error in (
        ConfigurationError,
        InvalidURLError,
        UnknownDialectError,
        MissingDriverError,
        SQLitePathError,
        AlreadyInitializedError,
        DatabaseUnreachableError,
        DatabaseReadOnlyError,
        UnsupportedIsolationLevelError,
        ScopeError,
        NoActiveScopeError,
        ReadOnlyError,
        RetryExhaustedError,
    ):
        assert issubclass(error, DbSessionError)
    assert issubclass(UnsupportedIsolationLevelError, ConfigurationError)
    assert issubclass(NoActiveScopeError, ScopeError)


def test_unknown_dialect_names_it_and_the_supported_ones() -> None:
    with pytest.raises(UnknownDialectError, match="'oracle9x'.*Use one of: sqlite, postgresql"):
        DbSessionFactory("oracle9x://u@h/db").engine.dispose()


def test_unknown_driver_is_an_unknown_dialect() -> None:
    with pytest.raises(UnknownDialectError, match="'postgresql\\+nosuchdriver'"):
        DbSessionFactory("postgresql+nosuchdriver://u@h/db").engine.dispose()


def test_missing_driver_says_what_to_install() -> None:
    with pytest.raises(MissingDriverError, match="pip install mysqlclient.*dbsession\\[mysql\\]"):
        DbSessionFactory("mysql+mysqldb://u@h/db").engine.dispose()


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("postgresql://postgres@127.0.0.1:1/test", "postgresql server at 127.0.0.1:1"),
        ("mysql://root@127.0.0.1:1/test", "mysql server at 127.0.0.1:1"),
    ],
)
def test_unreachable_server_names_host_and_port(url: str, where: str) -> None:
    with pytest.raises(DatabaseUnreachableError, match=where) as caught:
        connect(url)
    assert "Check that the server is running" in str(caught.value)


def test_sqlite_folder_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(SQLitePathError, match="does not exist: create it \\(mkdir -p"):
        open_sqlite(missing / "app.sqlite3")


def test_sqlite_folder_that_is_not_writable(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere on disk; /proc refuses even root
        folder = Path("/proc")
    else:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
    with pytest.raises(SQLitePathError, match="is not writable"):
        open_sqlite(folder / "app.sqlite3")


def test_invalid_engine_option_is_named() -> None:
    with pytest.raises(ConfigurationError, match="pool_sise"):
        DbSessionFactory("sqlite://", pool_sise=5).engine.dispose()


def _error_paths() -> list[Callable[[], object]]:
    pg = f"postgresql://postgres:{MARKER}@127.0.0.1:1/test?sslpassword={MARKER}"
    return [
        lambda: DbSessionFactory(f"postgresql://u:{MARKER}@host:notaport/db"),
        lambda: DbSessionFactory(f"oracle9x://u:{MARKER}@h/db").engine,
        lambda: DbSessionFactory(f"mysql+mysqldb://u:{MARKER}@h/db").engine,
        lambda: DbSessionFactory(f"postgresql://u:{MARKER}@h/db", pool_sise=1).engine,
        lambda: connect(pg),
        lambda: connect(f"mysql://root:{MARKER}@127.0.0.1:1/test"),
        lambda: (
            DbSessionFactory.global_init(f"postgresql://u:{MARKER}@h/one")
            and DbSessionFactory.global_init(f"postgresql://u:{MARKER}@h/two")
        ),
    ]


@pytest.mark.parametrize("trigger", _error_paths())
def test_no_password_in_any_error_repr_or_log_line(
    trigger: Callable[[], object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DbSessionError) as caught:
        trigger()
    rendered = "".join(traceback.format_exception(caught.value))
    for text_ in (str(caught.value), repr(caught.value), rendered, caplog.text):
        assert MARKER not in text_


def test_no_password_in_factory_repr_or_url_repr() -> None:
    factory = DbSessionFactory(f"postgresql://u:{MARKER}@h/db")
    assert MARKER not in repr(factory)
    assert MARKER not in repr(factory.url)
    assert MARKER not in str(factory.url)


def test_public_names_are_documented() -> None:
    for name in dbsession.__all__:
        obj = getattr(dbsession, name)
        if not isinstance(obj, (dict, str)):
            assert obj.__doc__, f"{name} has no docstring"
