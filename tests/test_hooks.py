"""on_commit(): after the outermost commit, never after a rollback."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from dbsession import DbSessionFactory, NoActiveScopeError, on_commit
from dbsession.example.models import Supplier


class Boom(Exception):
    pass


def test_hook_runs_after_the_commit_is_visible(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    seen: list[set[str]] = []

    def look() -> None:
        with other_connection.connect() as conn:
            seen.append(set(conn.scalars(text("SELECT name FROM supplier"))))

    with factory.session_scope() as session:
        session.add(Supplier(name="committed"))
        on_commit(look)
        assert seen == []
    assert seen == [{"committed"}]


def test_hook_is_dropped_on_rollback(factory: DbSessionFactory) -> None:
    ran: list[str] = []
    with pytest.raises(Boom):
        with factory.session_scope():
            on_commit(lambda: ran.append("hook"))
            raise Boom
    assert ran == []


@pytest.mark.backends("sqlite", "postgresql")  # deferred constraints; MariaDB has none
def test_hook_is_dropped_when_the_commit_fails_after_a_savepoint_left_open_was_released(
    factory: DbSessionFactory,
) -> None:
    """SQLAlchemy reports the release of a SAVEPOINT the block left open as a commit; the
    unit's own COMMIT failing after it (a deferred foreign key) runs no hook."""
    deferred = "DEFERRABLE INITIALLY DEFERRED"
    with factory.session_scope() as session:
        session.execute(text("CREATE TABLE hook_parent (id INTEGER PRIMARY KEY)"))
        session.execute(
            text(f"CREATE TABLE hook_child (pid INTEGER REFERENCES hook_parent (id) {deferred})")
        )
    ran: list[str] = []
    try:
        with pytest.raises(Exception, match="(?i)foreign key"):
            with factory.session_scope() as session:
                on_commit(lambda: ran.append("hook"))
                session.execute(text("INSERT INTO hook_child (pid) VALUES (99)"))
                session.begin_nested()  # left open: released by the unit's commit
        assert ran == []
    finally:
        with factory.session_scope() as session:
            session.execute(text("DROP TABLE hook_child"))
            session.execute(text("DROP TABLE hook_parent"))


def test_hook_is_dropped_when_its_failed_commit_rolls_back(factory: DbSessionFactory) -> None:
    ran: list[str] = []
    with factory.session_scope() as session:
        session.add(Supplier(name="dup"))
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        with factory.session_scope() as session:
            session.add(Supplier(name="dup"))
            on_commit(lambda: ran.append("hook"))
    assert ran == []


def test_hooks_of_a_released_savepoint_wait_for_the_outer_commit(
    factory: DbSessionFactory,
) -> None:
    ran: list[str] = []
    with factory.session_scope():
        on_commit(lambda: ran.append("outer"))
        with factory.session_scope():
            on_commit(lambda: ran.append("nested"))
        assert ran == []
    assert ran == ["outer", "nested"]


def test_hooks_of_a_rolled_back_savepoint_are_dropped(factory: DbSessionFactory) -> None:
    ran: list[str] = []
    with factory.session_scope():
        on_commit(lambda: ran.append("outer"))
        with pytest.raises(Boom):
            with factory.session_scope():
                on_commit(lambda: ran.append("nested"))
                raise Boom
    assert ran == ["outer"]


def test_hooks_of_a_released_savepoint_are_dropped_with_the_outer_rollback(
    factory: DbSessionFactory,
) -> None:
    ran: list[str] = []
    with pytest.raises(Boom):
        with factory.session_scope():
            with factory.session_scope():
                on_commit(lambda: ran.append("nested"))
            raise Boom
    assert ran == []


def test_independent_inner_scope_runs_its_hooks_at_its_own_commit(
    factory: DbSessionFactory,
) -> None:
    ran: list[str] = []
    with factory.session_scope():
        with factory.session_scope(independent=True):
            on_commit(lambda: ran.append("inner"))
        assert ran == ["inner"]
        on_commit(lambda: ran.append("outer"))
    assert ran == ["inner", "outer"]


def test_read_only_scope_that_ends_well_runs_its_hooks(factory: DbSessionFactory) -> None:
    ran: list[str] = []
    with factory.session_scope(readonly=True):
        on_commit(lambda: ran.append("read"))
    assert ran == ["read"]


def test_failing_hook_is_logged_and_the_others_still_run(
    factory: DbSessionFactory, other_connection: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def failing() -> None:
        raise Boom("hook failed")

    with factory.session_scope() as session:
        session.add(Supplier(name="kept"))
        on_commit(failing)
        on_commit(lambda: ran.append("second"))
    assert ran == ["second"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "on_commit hook" in errors[0].getMessage()
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is Boom
    with other_connection.connect() as conn:
        assert conn.scalar(text("SELECT name FROM supplier")) == "kept"


def test_hook_runs_after_the_session_is_closed(factory: DbSessionFactory) -> None:
    states: list[int] = []
    with factory.session_scope():
        on_commit(lambda: states.append(factory.engine.pool.checkedout()))  # type: ignore[attr-defined]
    assert states == [0]


def test_on_commit_outside_any_scope_is_a_named_error() -> None:
    with pytest.raises(NoActiveScopeError, match="on_commit"):
        on_commit(lambda: None)


def test_a_hook_registered_by_an_orm_event_of_the_final_flush_runs_after_the_commit(
    factory: DbSessionFactory,
) -> None:
    """``on_commit()`` from a mapper event (``after_insert``) of the flush that the scope's
    commit makes (the async twin: tests/aio/test_async_scope.py)."""
    ran: list[str] = []

    def announce(*_: object) -> None:
        on_commit(lambda: ran.append("announced"))

    event.listen(Supplier, "after_insert", announce)
    try:
        with factory.session_scope() as session:
            session.add(Supplier(name="late"))
    finally:
        event.remove(Supplier, "after_insert", announce)
    assert ran == ["announced"]
