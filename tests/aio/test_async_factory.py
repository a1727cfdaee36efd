"""AsyncDbSessionFactory: URL resolution, lazy one-time build, the default, errors, SQLite."""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from dbsession import ConfigurationError, DatabaseUnreachableError
from dbsession.asyncio import (
    AsyncDbSessionFactory,
    async_create_session,
    async_default_factory,
    async_session_scope,
)
from dbsession.errors import AlreadyInitializedError, MissingDriverError
from dbsession.example.models import Base, Customer, Order, Supplier

from .conftest import Run


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///app.db", "sqlite+aiosqlite"),
        ("postgresql://app@db/app", "postgresql+psycopg"),
        ("postgres://app@db/app", "postgresql+psycopg"),
        ("mysql://app@db/app", "mysql+aiomysql"),
        ("mariadb://app@db/app", "mariadb+aiomysql"),
        ("postgresql+asyncpg://app@db/app", "postgresql+asyncpg"),  # named: kept
    ],
)
def test_a_bare_url_gets_the_backends_async_driver(url: str, driver: str) -> None:
    assert AsyncDbSessionFactory(url).url.drivername == driver


def test_url_comes_from_database_url_like_the_sync_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:secret@db/app")
    factory = AsyncDbSessionFactory()
    assert factory.url.drivername == "postgresql+psycopg"
    assert factory.settings.source == "DATABASE_URL"
    assert "secret" not in repr(factory)


def test_default_is_the_embedded_sqlite_file(run: Run[Any]) -> None:
    async def body() -> None:
        async with async_session_scope() as session:
            assert (await session.execute(text("SELECT 1"))).scalar() == 1

    run(body())
    assert Path("dbsession.sqlite3").exists()


def test_many_tasks_racing_the_first_use_build_exactly_one_engine(
    run: Run[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def unit_of_work() -> int:
        async with async_session_scope() as session:
            await session.execute(text("SELECT 1"))
            return id(session.bind)

    async def body() -> set[int]:
        return set(await asyncio.gather(*(unit_of_work() for _ in range(50))))

    with caplog.at_level(logging.INFO, logger="dbsession"):
        binds = run(body())
    assert len(binds) == 1
    assert [r for r in caplog.records if "engine created" in r.getMessage()] != []
    assert len([r for r in caplog.records if "engine created" in r.getMessage()]) == 1


def test_many_threads_racing_the_first_use_build_exactly_one_engine(
    run: Run[Any], caplog: pytest.LogCaptureFixture
) -> None:
    barrier = threading.Barrier(8)

    def first_use(_: int) -> int:
        barrier.wait()
        return id(async_default_factory().engine)

    with caplog.at_level(logging.INFO, logger="dbsession"), ThreadPoolExecutor(8) as pool:
        engines = list(pool.map(first_use, range(8)))
    assert len(engines) == 8
    assert len(set(engines)) == 1
    assert len([r for r in caplog.records if "engine created" in r.getMessage()]) == 1


def test_global_init_with_another_url_is_refused_until_disposed(
    run: Run[Any], tmp_path: Path
) -> None:
    async def body() -> None:
        first = AsyncDbSessionFactory.global_init(f"sqlite:///{tmp_path / 'a.db'}")
        assert AsyncDbSessionFactory.global_init(f"sqlite:///{tmp_path / 'a.db'}") is first
        with pytest.raises(AlreadyInitializedError, match="AsyncDbSessionFactory.global_dispose"):
            AsyncDbSessionFactory.global_init(f"sqlite:///{tmp_path / 'b.db'}")
        await AsyncDbSessionFactory.global_dispose(allow_lazy=True)
        await AsyncDbSessionFactory.global_dispose(allow_lazy=True)  # nothing to dispose: fine
        second = AsyncDbSessionFactory.global_init(f"sqlite:///{tmp_path / 'b.db'}")
        assert second is not first

    run(body())


def test_async_create_session_is_managed_by_the_caller(run: Run[Any]) -> None:
    async def body() -> None:
        async with async_create_session() as session:
            assert (await session.execute(text("SELECT 2"))).scalar() == 2

    run(body())


def test_a_sync_driver_is_a_configuration_error_naming_the_async_ones() -> None:
    with pytest.raises(ConfigurationError, match="mysql\\+aiomysql") as raised:
        _ = AsyncDbSessionFactory("mysql+pymysql://app:secret@db/app").engine
    assert "secret" not in str(raised.value)


def test_missing_async_driver_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiomysql", None)
    with pytest.raises(MissingDriverError, match=r"pip install 'sqlalchemy-dbsession\[async\]'"):
        _ = AsyncDbSessionFactory("mysql://app@db/app").engine


def test_missing_greenlet_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "greenlet", None)
    with pytest.raises(MissingDriverError, match=r"greenlet.*'sqlalchemy-dbsession\[async\]'"):
        _ = AsyncDbSessionFactory("sqlite://").engine


@pytest.mark.parametrize(
    "url", ["postgresql://app:secret@127.0.0.1:1/app", "mysql://app:secret@127.0.0.1:1/app"]
)
def test_unreachable_server_names_host_and_port(url: str, run: Run[Any]) -> None:
    factory = AsyncDbSessionFactory(url)

    async def body() -> None:
        try:
            async with factory.session_scope() as session:
                await session.execute(text("SELECT 1"))
        finally:
            await factory.dispose()

    with pytest.raises(DatabaseUnreachableError, match="127.0.0.1:1") as raised:
        run(body())
    assert "secret" not in str(raised.value)


def test_importing_dbsession_imports_no_async_module() -> None:
    """dbsession adds no async module to what ``import sqlalchemy`` itself imports
    (SQLAlchemy 2.0 imports greenlet when it is installed; 2.1 does not)."""
    probe = (
        "import sys; {}; "
        "print(sorted(m for m in ('dbsession.asyncio', 'sqlalchemy.ext.asyncio', 'greenlet', "
        "'aiosqlite', 'aiomysql', 'asyncpg') if m in sys.modules))"
    )

    def imported(statement: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-c", probe.format(statement)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        return set(ast.literal_eval(out.stdout.strip()))

    by_sqlalchemy = imported("import sqlalchemy")
    assert by_sqlalchemy <= {"greenlet"}
    assert imported("import dbsession") == by_sqlalchemy


# --- SQLite opinions, on aiosqlite ---------------------------------------------------------


@pytest.fixture
def sqlite_async(tmp_path: Path, run: Run[Any]) -> Iterator[AsyncDbSessionFactory]:
    factory = AsyncDbSessionFactory(f"sqlite:///{tmp_path / 'app.sqlite3'}")
    run(factory.create_all(Base.metadata))
    yield factory
    run(factory.dispose())


def test_sqlite_foreign_keys_wal_and_busy_timeout(
    sqlite_async: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def pragmas() -> list[object]:
        async with sqlite_async.engine.connect() as connection:
            return [
                (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("foreign_keys", "journal_mode", "busy_timeout")
            ]

    assert run(pragmas()) == [1, "wal", 5000]


def test_sqlite_foreign_key_violation_is_refused(
    sqlite_async: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def body() -> None:
        async with sqlite_async.session_scope() as session:
            session.add(Order(customer_id=999, supplier_id=999, amount=1))

    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        run(body())


def test_sqlite_write_scope_takes_the_write_lock_at_begin(
    sqlite_async: AsyncDbSessionFactory, run: Run[Any], tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "app.sqlite3", timeout=0, isolation_level=None)

    async def body() -> None:
        async with sqlite_async.session_scope() as session:
            await session.execute(text("SELECT 1"))  # BEGIN IMMEDIATE, before any write
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")

    try:
        run(body())
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_sqlite_savepoint_rolls_back_only_the_nested_part(
    sqlite_async: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def body() -> list[str]:
        async with sqlite_async.session_scope() as session:
            session.add(Supplier(name="outer"))
            with pytest.raises(RuntimeError):
                async with session.begin_nested():
                    session.add(Supplier(name="inner"))
                    await session.flush()
                    raise RuntimeError
        async with sqlite_async.session_scope() as session:
            return list(await session.scalars(select(Supplier.name)))

    assert run(body()) == ["outer"]


def test_in_memory_sqlite_is_one_database_for_all_connections(run: Run[Any]) -> None:
    factory = AsyncDbSessionFactory("sqlite://")

    async def body() -> list[str]:
        await factory.create_all(Base.metadata)
        async with factory.session_scope() as first:
            first.add(Customer(name="Ada", email="ada@example.com"))
        connections = [await factory.engine.connect() for _ in range(3)]  # three at once
        try:
            return [
                name
                for connection in connections
                for name in await connection.scalars(select(Customer.name))
            ]
        finally:
            for connection in connections:
                await connection.close()
            await factory.dispose()

    assert run(body()) == ["Ada", "Ada", "Ada"]


def test_public_async_names_are_documented() -> None:
    import dbsession.asyncio

    for name in dbsession.asyncio.__all__:
        assert getattr(dbsession.asyncio, name).__doc__, f"{name} has no docstring"
    for method in ("session_scope", "create_session", "transactional", "create_all", "dispose"):
        assert getattr(AsyncDbSessionFactory, method).__doc__, f"{method} has no docstring"


def test_global_init_can_require_a_migrated_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run[Any]
) -> None:
    from dbsession import SchemaNotAtHeadError, migrations

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    url = f"sqlite:///{tmp_path / 'migrated.sqlite3'}"
    with pytest.raises(SchemaNotAtHeadError):
        AsyncDbSessionFactory.global_init(url, require_migrated=True)
    run(AsyncDbSessionFactory.global_dispose(allow_lazy=True))
    migrations.upgrade(url=url, migrations=root / "alembic.ini")
    made = AsyncDbSessionFactory.global_init(url, require_migrated=True)
    assert made.url.drivername == "sqlite+aiosqlite"
