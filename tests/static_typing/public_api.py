"""Static checks of the public API as a user's type checker sees it (mypy --strict in CI).

Not a test module (pytest does not collect it) and never run: every function is checked by
mypy. ``assert_type`` pins what the API returns; a line ending in ``# type: ignore[code]``
is a call that must stay a type error (mypy --strict reports the ignore as unused if
it stops being one). Keep it in step with the API: the lead's rewrite (issue 11)
types run_in_transaction and transactional with ParamSpec; add their checks here then.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from fastapi import FastAPI, Request
from flask import Flask
from sqlalchemy import Engine, MetaData
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import assert_type

import dbsession
from dbsession import (
    NAMING_CONVENTION,
    Base,
    DbSessionError,
    DbSessionFactory,
    RetryPolicy,
    create_session,
    current_session,
    mask_url,
    migrations,
    on_commit,
    run_in_transaction,
    session_scope,
)
from dbsession.asyncio import AsyncDbSessionFactory, async_create_session, async_session_scope
from dbsession.integrations.fastapi import DbSession, session_dependency
from dbsession.integrations.flask import unit_of_work


def the_package() -> None:
    assert_type(dbsession.__version__, str)
    assert_type(NAMING_CONVENTION, dict[str, str])
    assert_type(Base.metadata, MetaData)
    assert_type(mask_url("postgresql://u:p@h/d"), str)
    assert issubclass(dbsession.MigrationError, DbSessionError)


def sync_units_of_work(factory: DbSessionFactory) -> None:
    assert_type(session_scope(), AbstractContextManager[Session])
    with session_scope(readonly=True, isolation_level="SERIALIZABLE") as session:
        assert_type(session, Session)
        assert_type(current_session(), Session)
        on_commit(lambda: None)
    assert_type(create_session(), Session)
    with factory.session_scope() as session:
        assert_type(session, Session)
    assert_type(factory.engine, Engine)
    session_scope(readonly="yes")  # type: ignore[arg-type]
    on_commit(42)  # type: ignore[arg-type]


def transfer(session: Session, amount: int, *, note: str = "") -> int:
    return amount


def run_in_transaction_with_options(factory: DbSessionFactory) -> None:
    """The documented calls, options included, type-check; wrong arguments stay errors."""
    assert_type(run_in_transaction(transfer, 5), int)
    assert_type(run_in_transaction(transfer, 5, retry=RetryPolicy(attempts=10)), int)
    assert_type(factory.run_in_transaction(transfer, 5, note="x", readonly=True), int)
    assert_type(factory.run_in_transaction(transfer, 5, isolation_level="SERIALIZABLE"), int)
    run_in_transaction(transfer, "five")  # type: ignore[call-overload]
    run_in_transaction(transfer, 5, retry=10)  # type: ignore[call-arg]


async def async_units_of_work(factory: AsyncDbSessionFactory) -> None:
    async with async_session_scope() as session:
        assert_type(session, AsyncSession)
    async with factory.session_scope(readonly=True) as session:
        assert_type(session, AsyncSession)
    assert_type(async_create_session(), AsyncSession)


def the_migrations() -> None:
    migrations.upgrade(url="sqlite:///app.sqlite3", migrations="migrations")
    assert_type(migrations.current(), str | None)
    assert_type(migrations.head(), str)
    assert_type(migrations.is_at_head(), bool)
    migrations.upgrade(revision=1)  # type: ignore[arg-type]
    migrations.upgrade(lock_wait=migrations.LockWait(seconds=2, attempts=10))
    migrations.upgrade(lock_wait="2")  # type: ignore[arg-type]
    assert_type(migrations.lint(backends=["postgresql"]), list[migrations.Finding])
    assert_type(migrations.rehearse(), list[migrations.RehearsedStatement])


async def the_fastapi_integration(
    app: FastAPI, factory: DbSessionFactory, request: Request
) -> None:
    @app.get("/")
    def endpoint(session: DbSession) -> int:
        assert_type(session, Session)
        return 1

    dependency = session_dependency(factory)
    async for session in dependency(request):
        assert_type(session, Session)


def the_flask_integration(app: Flask) -> None:
    @app.post("/customers/<int:customer_id>")
    @unit_of_work()
    def view(session: Session, customer_id: int) -> tuple[dict[str, int], int]:
        return {"id": customer_id}, 201

    assert_type(view(customer_id=1), tuple[dict[str, int], int])
    view(customer_id="one")  # type: ignore[arg-type]

    @unit_of_work()  # type: ignore[arg-type]
    def no_session(customer_id: int) -> None:
        """A view that does not take the session first is refused."""
