"""session_scope() as a SAVEPOINT, independent inner scopes, current_session()."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dbsession import (
    DbSessionFactory,
    NoActiveScopeError,
    ReadOnlyError,
    _guard,
    bulk_insert,
    current_session,
    session_scope,
)
from dbsession.errors import ScopeError
from dbsession.example.models import Base, Supplier


class Boom(Exception):
    pass


def names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT name FROM supplier")))


def test_nested_scope_joins_the_outer_session(factory: DbSessionFactory) -> None:
    with factory.session_scope() as outer:
        with factory.session_scope() as inner:
            assert inner is outer
            assert current_session() is outer


def test_failed_nested_scope_rolls_back_to_its_savepoint_only(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with factory.session_scope() as session:
        session.add(Supplier(name="before"))
        with pytest.raises(Boom):
            with factory.session_scope() as nested:
                nested.add(Supplier(name="inside"))
                nested.flush()
                raise Boom
        session.add(Supplier(name="after"))
    assert names(other_connection) == {"before", "after"}


def test_outer_commit_includes_the_nested_work(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with factory.session_scope() as session:
        session.add(Supplier(name="outer"))
        with factory.session_scope() as nested:
            nested.add(Supplier(name="nested"))
    assert names(other_connection) == {"outer", "nested"}


def test_outer_rollback_discards_the_released_savepoint(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with pytest.raises(Boom):
        with factory.session_scope():
            with factory.session_scope() as nested:
                nested.add(Supplier(name="nested"))
            raise Boom
    assert names(other_connection) == set()


def test_nested_outside_any_scope_is_a_normal_scope(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with factory.session_scope() as session:
        session.add(Supplier(name="alone"))
    assert names(other_connection) == {"alone"}
    with pytest.raises(Boom):
        with factory.session_scope() as session:
            session.add(Supplier(name="rolled back"))
            session.flush()
            raise Boom
    assert names(other_connection) == {"alone"}


def test_independent_scope_inside_another_is_a_separate_transaction(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    # The outer scope has not touched the database yet, so SQLite's single writer is free.
    with pytest.raises(Boom):
        with factory.session_scope() as outer:
            with factory.session_scope(independent=True) as inner:
                assert inner is not outer
                assert current_session() is inner
                inner.add(Supplier(name="independent"))
            assert current_session() is outer
            raise Boom
    assert names(other_connection) == {"independent"}


def test_a_plain_scope_inside_a_writing_scope_joins_instead_of_deadlocking(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with factory.session_scope() as outer:
        outer.add(Supplier(name="outer"))
        outer.flush()  # holds the row / SQLite's write lock
        with factory.session_scope() as inner:
            assert inner is outer
            inner.add(Supplier(name="inner"))
    assert names(other_connection) == {"outer", "inner"}


def test_deprecated_nested_flag_still_works_with_a_warning(factory: DbSessionFactory) -> None:
    with factory.session_scope() as outer:
        with pytest.warns(DeprecationWarning, match="independent=True"):
            scope = factory.session_scope(nested=True)
        with scope as inner:
            assert inner is outer
        with pytest.warns(DeprecationWarning):
            separate = factory.session_scope(nested=False)
    with separate as session:
        assert session is not outer


def test_sqlite_independent_writer_inside_a_writing_scope_waits_then_fails(
    tmp_path: Path,
) -> None:
    factory = DbSessionFactory(f"sqlite:///{tmp_path}/one.sqlite3", sqlite_busy_timeout=0.1)
    try:
        factory.create_all(Base.metadata)
        with factory.session_scope() as outer:
            outer.add(Supplier(name="outer"))
            outer.flush()  # BEGIN IMMEDIATE: this scope holds the only write lock
            with pytest.raises(OperationalError, match="database is locked"):
                with factory.session_scope(independent=True) as inner:
                    inner.add(Supplier(name="inner"))
            with factory.session_scope() as nested:
                nested.add(Supplier(name="nested"))
        with factory.session_scope(readonly=True) as session:
            assert set(session.scalars(text("SELECT name FROM supplier"))) == {"outer", "nested"}
    finally:
        factory.dispose()


def test_nested_joins_only_scopes_of_the_same_factory(
    factory: DbSessionFactory, tmp_path: Path
) -> None:
    other = DbSessionFactory(f"sqlite:///{tmp_path}/other.sqlite3")
    try:
        with factory.session_scope() as outer:
            with other.session_scope() as session:
                assert session is not outer
                assert session.get_bind().engine.url == other.url
    finally:
        other.dispose()


def test_read_only_scope_joined_to_a_writing_one_sees_its_writes_and_refuses_its_own(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with factory.session_scope() as outer:
        outer.add(Supplier(name="uncommitted"))
        with factory.session_scope(readonly=True) as reader:
            assert reader is outer
            assert set(reader.scalars(select(Supplier.name))) == {"uncommitted"}
        with pytest.raises(ReadOnlyError):
            with factory.session_scope(readonly=True) as reader:
                reader.add(Supplier(name="written in a read-only scope"))
        with pytest.raises(ReadOnlyError):
            with factory.session_scope(readonly=True) as reader:
                reader.execute(update(Supplier).values(name="renamed"))
        with pytest.raises(ReadOnlyError):
            with factory.session_scope(readonly=True) as reader:
                reader.execute(text("DELETE FROM supplier"))
        outer.add(Supplier(name="after"))  # the writing scope writes again
    assert names(other_connection) == {"uncommitted", "after"}


WRITES_BELOW_THE_ORM_EVENTS: dict[str, Callable[[Session], object]] = {
    "bulk_save_objects": lambda s: s.bulk_save_objects([Supplier(name="bulk")]),
    "bulk_insert_mappings": lambda s: s.bulk_insert_mappings(Supplier, [{"name": "m"}]),
    "bulk_update_mappings": lambda s: s.bulk_update_mappings(
        Supplier, [{"id": s.scalars(select(Supplier.id)).first(), "name": "m"}]
    ),
    "ORM bulk insert": lambda s: s.execute(insert(Supplier), [{"name": "x"}, {"name": "y"}]),
    "connection().execute": lambda s: s.connection().execute(
        text("INSERT INTO supplier (name) VALUES ('raw')")
    ),
    "commented INSERT": lambda s: s.execute(
        text("/* why */ INSERT INTO supplier (name) VALUES ('c')")
    ),
    "bulk_insert": lambda s: bulk_insert(s, Supplier, [{"name": "b"}]),
}


@pytest.mark.parametrize("write", list(WRITES_BELOW_THE_ORM_EVENTS))
def test_a_joined_read_only_scope_refuses_writes_that_bypass_the_orm_events(
    factory: DbSessionFactory, other_connection: Engine, write: str
) -> None:
    """The guard checks every statement sent on the connection while it is on, and
    bulk_insert asks it (COPY sends none); after the block the scope writes again."""
    with factory.session_scope() as outer:
        outer.add(Supplier(name="kept"))
        with pytest.raises(ReadOnlyError, match="refused inside session_scope"):
            with factory.session_scope(readonly=True) as reader:
                WRITES_BELOW_THE_ORM_EVENTS[write](reader)
        outer.add(Supplier(name="after"))
    assert names(other_connection) == {"kept", "after"}


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("SELECT 1", False),
        ("  /* a */ -- b\n (SELECT 1)", False),
        ("WITH v AS (SELECT 1 AS last_update) SELECT * FROM v", False),
        ("SAVEPOINT sa_1", False),
        ("RELEASE SAVEPOINT sa_1", False),
        ("ROLLBACK TO SAVEPOINT sa_1", False),
        ("WITH v (n) AS (SELECT 'x') INSERT INTO t (n) SELECT n FROM v", True),
        ("/* why */ insert into t values (1)", True),
        ("UPDATE t SET n = 1", True),
        ("CREATE TABLE t (n INT)", True),
        ("TRUNCATE t", True),
    ],
)
def test_the_guard_judges_sql_by_its_first_word_past_comments_and_ctes(
    sql: str, writes: bool
) -> None:
    assert _guard.writes(sql) is writes


def test_nested_scope_cannot_change_the_isolation_level(factory: DbSessionFactory) -> None:
    with factory.session_scope():
        with pytest.raises(ScopeError, match="cannot change its isolation level"):
            factory.session_scope(isolation_level="SERIALIZABLE")
    with factory.session_scope(isolation_level="SERIALIZABLE") as outer:
        with factory.session_scope(isolation_level="serializable") as nested:
            assert nested is outer


def test_current_session_outside_any_scope_is_a_named_error() -> None:
    with pytest.raises(NoActiveScopeError, match="outside any session_scope"):
        current_session()


def test_current_session_is_per_thread(factory: DbSessionFactory) -> None:
    seen: list[BaseException] = []

    def other_thread() -> None:
        try:
            current_session()
        except BaseException as error:
            seen.append(error)

    with factory.session_scope():
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(seen) == 1 and isinstance(seen[0], NoActiveScopeError)


def test_current_session_is_per_asyncio_task(factory: DbSessionFactory) -> None:
    async def in_scope(started: asyncio.Event, release: asyncio.Event) -> Session:
        with factory.session_scope() as session:
            started.set()
            await release.wait()
            assert current_session() is session
            return session

    async def outside(started: asyncio.Event, release: asyncio.Event) -> bool:
        await started.wait()
        try:
            current_session()
        except NoActiveScopeError:
            return True
        finally:
            release.set()
        return False

    async def main() -> tuple[Session, bool]:
        started, release = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(in_scope(started, release), outside(started, release))

    _, outside_saw_none = asyncio.run(main())
    assert outside_saw_none


def test_module_level_nested_scope_uses_the_default(tmp_path: Path) -> None:
    DbSessionFactory.global_init(f"sqlite:///{tmp_path}/default.sqlite3").create_all(Base.metadata)
    with session_scope() as outer:
        with session_scope() as nested:
            assert nested is outer
