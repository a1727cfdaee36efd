"""DbSessionFactory: one engine per URL, built lazily, once, thread-safely."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

from dbsession import DbSessionFactory, create_session, default_factory, session_scope
from dbsession._engine import DEFAULT_MAX_OVERFLOW, DEFAULT_POOL_SIZE
from dbsession.errors import AlreadyInitializedError
from dbsession.example.models import Base, Supplier


def sqlite_url(tmp_path: Path, name: str = "app") -> str:
    return f"sqlite:///{tmp_path / name}.sqlite3"


def test_global_init_twice_with_the_same_url_is_a_no_op(tmp_path: Path) -> None:
    first = DbSessionFactory.global_init(sqlite_url(tmp_path))
    engine = first.engine
    second = DbSessionFactory.global_init(sqlite_url(tmp_path))
    assert second is first
    assert second.engine is engine


def test_global_init_with_another_url_names_both_masked(tmp_path: Path) -> None:
    DbSessionFactory.global_init(sqlite_url(tmp_path, "one"))
    with pytest.raises(AlreadyInitializedError) as caught:
        DbSessionFactory.global_init("postgresql://app:hunter2@db.example/app")
    message = str(caught.value)
    assert "one.sqlite3" in message
    assert "postgresql+psycopg://app:***@db.example/app" in message
    assert "hunter2" not in message
    assert "dispose()" in message


def test_global_init_with_other_options_is_an_error(tmp_path: Path) -> None:
    DbSessionFactory.global_init(sqlite_url(tmp_path))
    with pytest.raises(AlreadyInitializedError, match="with other options"):
        DbSessionFactory.global_init(sqlite_url(tmp_path), sqlite_busy_timeout=1)


def test_dispose_allows_switching_the_default(tmp_path: Path) -> None:
    DbSessionFactory.global_init(sqlite_url(tmp_path, "one"))
    DbSessionFactory.global_dispose(allow_lazy=True)
    switched = DbSessionFactory.global_init(sqlite_url(tmp_path, "two"))
    assert switched.url.database is not None
    assert switched.url.database.endswith("two.sqlite3")


@pytest.mark.parametrize("first_use", ["session_scope", "create_session", "default_factory"])
def test_first_use_initialises_the_default_lazily(
    first_use: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url(tmp_path, "lazy"))
    assert DbSessionFactory.registry.current is None
    if first_use == "session_scope":
        with session_scope() as session:
            assert session.scalar(text("SELECT 1")) == 1
    elif first_use == "create_session":
        create_session().close()
    else:
        default_factory().engine.dispose()
    default = default_factory()
    assert default.settings.source == "DATABASE_URL"
    assert str(default.url).endswith("lazy.sqlite3")


def test_class_and_module_functions_use_the_process_default(tmp_path: Path) -> None:
    default = DbSessionFactory.global_init(sqlite_url(tmp_path))
    assert default_factory().engine is default.engine
    with session_scope() as session:
        assert session.get_bind().engine.url == default.engine.url


def test_32_threads_racing_the_first_call_build_exactly_one_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url(tmp_path, "race"))
    barrier = threading.Barrier(32)
    engines: list[Engine] = []
    lock = threading.Lock()

    def first_call() -> None:
        barrier.wait()
        with session_scope() as session:
            session.execute(text("SELECT 1"))
        with lock:
            engines.append(default_factory().engine)

    caplog.set_level(logging.INFO, logger="dbsession")
    threads = [threading.Thread(target=first_call) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(engines) == 32
    assert len({id(engine) for engine in engines}) == 1
    created = [r for r in caplog.records if "engine created" in r.getMessage()]
    assert len(created) == 1


def test_instances_are_independent_databases(tmp_path: Path) -> None:
    main = DbSessionFactory(sqlite_url(tmp_path, "main"))
    reports = DbSessionFactory(sqlite_url(tmp_path, "reports"))
    try:
        main.create_all(Base.metadata)
        reports.create_all(Base.metadata)
        with main.session_scope() as session:
            session.add(Supplier(name="only in main"))
        with reports.session_scope() as session:
            assert session.query(Supplier).count() == 0
        with main.session_scope() as session:
            assert session.query(Supplier).count() == 1
        assert main.engine is not reports.engine
        assert DbSessionFactory.registry.current is None
    finally:
        main.dispose()
        reports.dispose()


def test_dispose_closes_the_pool_and_the_next_use_rebuilds(factory: DbSessionFactory) -> None:
    with factory.session_scope() as session:
        session.execute(text("SELECT 1"))
    engine = factory.engine
    assert engine.pool.checkedin() >= 1  # type: ignore[attr-defined]
    factory.dispose()
    assert engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    assert factory.engine is not engine


def test_engine_options_are_passed_through_and_override_defaults(tmp_path: Path) -> None:
    factory = DbSessionFactory(sqlite_url(tmp_path), pool_pre_ping=False, echo=True)
    assert factory.engine.pool._pre_ping is False
    assert factory.engine.echo is True
    factory.dispose()


def test_pool_pre_ping_is_replaced_by_the_cheaper_liveness_check(backend_url: URL) -> None:
    """No SELECT 1 per checkout (see test_opinions.py and the stale-pool tests), and the
    pool size of the opinion."""
    factory = DbSessionFactory(backend_url)
    pool: Any = factory.engine.pool
    assert pool._pre_ping is False
    assert (pool.size(), pool._max_overflow) == (DEFAULT_POOL_SIZE, DEFAULT_MAX_OVERFLOW)
    factory.dispose()


def test_repr_shows_the_masked_url() -> None:
    factory = DbSessionFactory("postgresql://app:hunter2@db/app")
    assert "hunter2" not in repr(factory)
    assert "app:***@db/app" in repr(factory)


def test_create_all_creates_the_base_tables(tmp_path: Path) -> None:
    factory = DbSessionFactory.global_init(sqlite_url(tmp_path))
    default_factory().create_all(Base.metadata)
    with factory.engine.connect() as conn:
        tables = set(conn.scalars(text("SELECT name FROM sqlite_master WHERE type='table'")))
    assert {"customer", "supplier", "orders"} <= tables


def test_global_init_after_lazy_use_with_the_same_url_is_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url(tmp_path))
    lazy = default_factory()
    assert DbSessionFactory.global_init(sqlite_url(tmp_path)) is lazy
