"""Issue 12: settings that would switch the unit of work off are refused, and a disposed
process default is not silently made again from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

import dbsession
from dbsession import DbSessionFactory
from dbsession.errors import NotInitializedError, UnsupportedIsolationLevelError
from dbsession.example.models import Supplier


@pytest.mark.parametrize(
    "options",
    [
        {"isolation_level": "AUTOCOMMIT"},
        {"isolation_level": "autocommit"},
        {"execution_options": {"isolation_level": "AUTOCOMMIT"}},
    ],
)
def test_autocommit_as_an_engine_option_is_refused_naming_what_to_use(
    backend_url: URL, options: dict[str, Any]
) -> None:
    for make in (DbSessionFactory, DbSessionFactory.global_init):
        with pytest.raises(UnsupportedIsolationLevelError) as raised:
            make(backend_url, **options)
        message = str(raised.value)
        assert "AUTOCOMMIT" in message
        assert "engine.connect().execution_options(isolation_level='AUTOCOMMIT')" in message
        assert "session_scope(isolation_level=" in message


def test_another_engine_isolation_level_is_accepted(backend_url: URL) -> None:
    made = DbSessionFactory(backend_url, isolation_level="READ COMMITTED")
    try:
        if backend_url.get_backend_name() != "sqlite":  # SQLite has no READ COMMITTED
            with made.session_scope() as session:
                session.connection()
    finally:
        made.dispose()


def test_a_late_unit_of_work_after_global_dispose_raises_and_creates_nothing(
    factory: DbSessionFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere.sqlite3"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{elsewhere}")
    DbSessionFactory.global_init(factory.url)
    with dbsession.session_scope() as session:
        session.add(Supplier(name="before"))
    DbSessionFactory.global_dispose()
    for late in (
        lambda: dbsession.session_scope(),
        lambda: dbsession.run_in_transaction(lambda session: None),
        lambda: dbsession.create_session(),
    ):
        with pytest.raises(NotInitializedError, match="global_init"):
            late()
    assert not elsewhere.exists()
    assert not (Path.cwd() / "dbsession.sqlite3").exists()
    DbSessionFactory.global_init(factory.url)  # a new global_init makes it usable again
    with dbsession.session_scope() as session:
        session.add(Supplier(name="after"))
