"""session_scope(readonly=True), the replica, and session_scope(isolation_level=...)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import statements
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Engine

from dbsession import DbSessionFactory, ReadOnlyError, session_scope
from dbsession.errors import AlreadyInitializedError, UnsupportedIsolationLevelError
from dbsession.example.models import Base, Supplier


@pytest.fixture
def one_connection(backend_url: URL) -> Iterator[DbSessionFactory]:
    """A factory whose pool holds exactly one connection, so every scope reuses it."""
    made = DbSessionFactory(backend_url, pool_size=1, max_overflow=0)
    Base.metadata.create_all(made.engine)
    yield made
    Base.metadata.drop_all(made.engine)
    made.dispose()


def test_orm_write_in_a_read_only_scope_is_a_read_only_error(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with pytest.raises(ReadOnlyError, match="read-only") as caught:
        with factory.session_scope(readonly=True) as session:
            session.add(Supplier(name="never"))
            session.flush()
    assert isinstance(caught.value.__cause__, factory.engine.dialect.loaded_dbapi.Error)
    with other_connection.connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM supplier")) == 0


def test_sql_write_in_a_read_only_scope_is_a_read_only_error(factory: DbSessionFactory) -> None:
    with factory.session_scope(readonly=True) as session:
        with pytest.raises(ReadOnlyError):
            session.execute(text("UPDATE supplier SET name = 'x'"))


def test_read_only_scope_reads_and_ends_with_a_commit_of_its_read_only_transaction(
    factory: DbSessionFactory,
) -> None:
    ended: list[str] = []
    with factory.session_scope() as session:
        session.add(Supplier(name="visible"))
    with factory.session_scope(readonly=True) as session:
        bind = session.get_bind()  # on SQLite, the read-only twin engine
        event.listen(bind, "commit", lambda conn: ended.append("commit"))
        event.listen(bind, "rollback", lambda conn: ended.append("rollback"))
        assert session.scalars(text("SELECT name FROM supplier")).all() == ["visible"]
    assert ended == ["commit"]


def test_connection_is_writable_again_after_a_read_only_scope(
    one_connection: DbSessionFactory, other_connection: Engine
) -> None:
    with one_connection.session_scope(readonly=True) as session:
        reader_pid = id(session.connection().connection.dbapi_connection)
    with one_connection.session_scope() as session:  # read-only scopes read on a twin's pool
        assert id(session.connection().connection.dbapi_connection) != reader_pid
        session.add(Supplier(name="written"))
    with other_connection.connect() as conn:
        assert conn.scalar(text("SELECT name FROM supplier")) == "written"
    raw = one_connection.engine.raw_connection()  # the driver's read-only flag was cleared
    try:
        cursor = raw.cursor()
        cursor.execute("INSERT INTO supplier (name) VALUES ('raw')")
        raw.commit()
    finally:
        raw.close()


def test_read_only_scope_after_an_error_leaves_the_connection_writable(
    one_connection: DbSessionFactory,
) -> None:
    with pytest.raises(ReadOnlyError):
        with one_connection.session_scope(readonly=True) as session:
            session.add(Supplier(name="refused"))
    with one_connection.session_scope() as session:
        session.add(Supplier(name="accepted"))
        session.flush()


def test_replica_serves_read_only_scopes_and_the_primary_the_rest(
    backend_url: URL, factory: DbSessionFactory
) -> None:
    routed = DbSessionFactory(backend_url, replica_url=backend_url)
    try:
        assert routed.replica_engine is not None
        assert routed.replica_engine is not routed.engine
        on_primary = statements(routed.engine)
        twin = routed._build(replica=True).read_only_engine()
        on_replica = statements(routed.replica_engine, twin)
        with routed.session_scope() as session:
            session.add(Supplier(name="via primary"))
        assert any("INSERT" in s for s in on_primary) and on_replica == []
        on_primary.clear()
        with routed.session_scope(readonly=True) as session:
            assert session.scalar(text("SELECT name FROM supplier /* replica */")) == "via primary"
        assert any("/* replica */" in s for s in on_replica)
        assert not any("/* replica */" in s for s in on_primary)
        with pytest.raises(ReadOnlyError):
            with routed.session_scope(readonly=True) as session:
                session.add(Supplier(name="refused by the replica too"))
    finally:
        routed.dispose()


def test_without_a_replica_there_is_no_replica_engine(factory: DbSessionFactory) -> None:
    assert factory.replica_engine is None


def test_global_init_takes_a_replica_url(tmp_path: Path) -> None:
    url, replica = f"sqlite:///{tmp_path}/p.sqlite3", f"sqlite:///{tmp_path}/r.sqlite3"
    default = DbSessionFactory.global_init(url, replica_url=replica)
    for made in (default.engine, default.replica_engine):
        assert made is not None
        Base.metadata.create_all(made)
    with session_scope() as session:
        session.add(Supplier(name="primary only"))
    with session_scope(readonly=True) as session:
        assert session.scalar(text("SELECT COUNT(*) FROM supplier")) == 0
    assert DbSessionFactory.global_init(url, replica_url=replica) is default
    with pytest.raises(AlreadyInitializedError, match="replica"):
        DbSessionFactory.global_init(url, replica_url="postgresql://u:hunter2@replica/db")


def test_replica_password_is_masked_in_the_repr_of_settings() -> None:
    made = DbSessionFactory("sqlite://", replica_url="postgresql://u:hunter2@replica/db")
    assert "hunter2" not in made.settings.describe()
    assert "u:***@replica/db" in made.settings.describe()


@pytest.mark.parametrize("asked", ["READ UNCOMMITTED", "read_uncommitted", " Read  Uncommitted "])
def test_isolation_level_applies_to_the_scope_only(
    one_connection: DbSessionFactory, asked: str
) -> None:
    with one_connection.session_scope() as session:
        default = session.connection().get_isolation_level()
    assert default != "READ UNCOMMITTED"
    with one_connection.session_scope(isolation_level=asked) as session:
        assert session.connection().get_isolation_level() == "READ UNCOMMITTED"
    with one_connection.session_scope() as session:
        assert session.connection().get_isolation_level() == default


def test_serializable_scope_on_every_backend(factory: DbSessionFactory) -> None:
    with factory.session_scope(isolation_level="SERIALIZABLE") as session:
        assert session.connection().get_isolation_level() == "SERIALIZABLE"
        session.add(Supplier(name="serial"))
    with factory.session_scope(readonly=True, isolation_level="SERIALIZABLE") as session:
        assert session.scalar(text("SELECT name FROM supplier")) == "serial"


@pytest.mark.parametrize("level", ["SNAPSHOT", "CHAOS", "AUTOCOMMIT"])
def test_unsupported_isolation_level_is_a_clear_error(
    factory: DbSessionFactory, level: str
) -> None:
    with pytest.raises(UnsupportedIsolationLevelError, match=level) as caught:
        factory.session_scope(isolation_level=level)
    if level != "AUTOCOMMIT":
        assert "SERIALIZABLE" in str(caught.value)  # the message lists the supported ones


def test_sqlite_has_no_read_committed(tmp_path: Path) -> None:
    made = DbSessionFactory(f"sqlite:///{tmp_path}/iso.sqlite3")
    try:
        with pytest.raises(UnsupportedIsolationLevelError, match="use one of: READ UNCOMMITTED"):
            made.session_scope(isolation_level="read committed")
    finally:
        made.dispose()
