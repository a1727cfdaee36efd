"""SQLModel's AsyncSession as the async factory's session class: ``await session.exec()``
in a scope, with commit, rollback and on_commit hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession

from dbsession import on_commit
from dbsession.asyncio import AsyncDbSessionFactory

from .conftest import Run

pytest.importorskip("sqlmodel", reason="needs pip install 'sqlalchemy-dbsession[test]'")
from sqlmodel import Field, SQLModel, select  # noqa: E402
from sqlmodel.ext.asyncio.session import AsyncSession  # noqa: E402


class Villain(SQLModel, table=True):
    __tablename__ = "sqlmodel_villain"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=50)


def test_async_scopes_are_sqlmodel_sessions(tmp_path: Path, run: Run[Any]) -> None:
    factory = AsyncDbSessionFactory(
        f"sqlite:///{tmp_path / 'villains.sqlite3'}", session_class=AsyncSession
    )
    ran: list[str] = []

    async def body() -> list[str]:
        try:
            async with factory.engine.begin() as connection:
                await connection.run_sync(SQLModel.metadata.create_all)
            async with factory.session_scope() as session:
                assert isinstance(session, AsyncSession)
                session.add(Villain(name="Dr. Weird"))
                on_commit(lambda: ran.append("committed"))
            with pytest.raises(ZeroDivisionError):
                async with factory.session_scope() as session:
                    session.add(Villain(name="Kept Nowhere"))
                    raise ZeroDivisionError
            async with factory.session_scope(readonly=True) as session:
                assert isinstance(session, AsyncSession)
                return list((await session.exec(select(Villain.name))).all())
        finally:
            await factory.dispose()

    assert run(body()) == ["Dr. Weird"]
    assert ran == ["committed"]


def test_the_async_factory_refuses_a_sync_session_class() -> None:
    from dbsession.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="not a subclass of sqlalchemy.ext.asyncio"):
        AsyncDbSessionFactory("sqlite://", session_class=SAAsyncSession.sync_session_class)
