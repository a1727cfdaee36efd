"""What a newcomer and a 0.1 user trip on says what to do: a forgotten global_init() falling
back to the embedded SQLite file is a WARNING, 0.1 calls name their 0.2 spelling, and
``dbsession --version`` answers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

import dbsession
from dbsession import DbSessionFactory, RetryPolicy, _lifecycle, run_in_transaction, session_scope
from dbsession.cli import main as cli
from dbsession.errors import RemovedAPIError


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """As if nothing had warned yet in this process."""
    monkeypatch.setattr(_lifecycle, "_warned_embedded_default", False)
    caplog.set_level(logging.WARNING, logger="dbsession")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_forgotten_global_init_warns_once_naming_the_file(
    fresh_process: None, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(2):
        with session_scope():
            pass
    DbSessionFactory.global_dispose(allow_lazy=True)
    with session_scope():
        pass
    file = Path("dbsession.sqlite3").absolute()
    assert warnings_of(caplog) == [
        "dbsession: no DbSessionFactory.global_init() was called and DATABASE_URL is not set: "
        f"using the embedded SQLite file {file}. Set DATABASE_URL, or call global_init(url) "
        "at start-up (global_init() without a URL chooses this file and says nothing)."
    ]


def test_the_embedded_default_chosen_explicitly_says_nothing(
    fresh_process: None, caplog: pytest.LogCaptureFixture
) -> None:
    DbSessionFactory.global_init()
    with session_scope():
        pass
    assert warnings_of(caplog) == []


def test_database_url_says_nothing(
    fresh_process: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite:///app.sqlite3")
    with session_scope():
        pass
    assert warnings_of(caplog) == []


@pytest.mark.parametrize(
    ("name", "instead"),
    [
        ("create_all", "dbsession.default_factory().create_all()"),
        ("session_scope", "dbsession.session_scope()"),
        ("create_session", "dbsession.create_session()"),
        ("run_in_transaction", "dbsession.run_in_transaction(fn, ...)"),
        ("transactional", "@dbsession.transactional"),
        ("dispose", "DbSessionFactory.global_dispose()"),
    ],
)
def test_a_01_class_level_call_names_its_02_spelling(name: str, instead: str) -> None:
    with pytest.raises(RemovedAPIError) as caught:  # also a TypeError, as before 0.2
        getattr(DbSessionFactory, name)()
    assert isinstance(caught.value, TypeError)
    assert str(caught.value) == (
        f"DbSessionFactory.{name}() on the class was removed in 0.2: use {instead}, or "
        f"factory.{name}() on a factory (the one global_init() returns)."
    )


def test_the_methods_still_work_on_instances_and_through_the_class() -> None:
    factory = DbSessionFactory("sqlite://")
    DbSessionFactory.create_all(factory)  # the explicit-self spelling is a normal call
    with factory.session_scope() as session:
        assert isinstance(session, Session)
    factory.dispose()


def add(session: Session, name: str, **extra: object) -> dict[str, object]:
    return extra


@pytest.mark.parametrize("keyword", ["attempts", "base_delay", "max_delay"])
def test_a_01_retry_keyword_names_retry_policy(keyword: str) -> None:
    with pytest.raises(RemovedAPIError) as caught:
        run_in_transaction(add, "x", **{keyword: 3})  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"run_in_transaction({keyword}=3): these keywords were removed in 0.2; pass "
        f"retry=RetryPolicy({keyword}=3) instead (from dbsession import RetryPolicy)."
    )


def test_the_02_spelling_runs_and_other_keywords_reach_the_function() -> None:
    result = run_in_transaction(add, "x", retry=RetryPolicy(attempts=10), colour="red")
    assert result == {"colour": "red"}
    with pytest.raises(TypeError, match="retry= takes a RetryPolicy, got int"):
        run_in_transaction(add, "x", retry=10)  # type: ignore[arg-type]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dbsession {dbsession.__version__} (SQLAlchemy ")
    assert str(Path(dbsession.__file__).parent) in out
