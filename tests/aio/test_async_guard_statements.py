"""The read-only guard of an async scope joined to a writing one refuses the statements
that passed it when it judged the first word only (tests/test_guard_statements.py has
the full list; the guard is the same code under the async session)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from dbsession import ReadOnlyError
from dbsession.asyncio import AsyncDbSessionFactory

from .conftest import Run

FIRST_WORD_WAS_A_READ = {
    "sqlite": ["PRAGMA user_version = 42", "ROLLBACK"],
    "postgresql": [
        "EXPLAIN ANALYZE DELETE FROM supplier",
        "SELECT name INTO guard_copy FROM supplier",
        "SET transaction_read_only = off",
    ],
    "mysql": ["SET autocommit = 1", "SELECT name FROM supplier FOR UPDATE"],
}


def test_joined_async_read_only_scope_refuses_what_looks_like_a_read(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    statements = FIRST_WORD_WAS_A_READ[async_factory.url.get_backend_name()]

    async def body() -> list[str]:
        async with async_factory.session_scope() as outer:
            await outer.execute(text("INSERT INTO supplier (name) VALUES ('first half')"))
            for sql in statements:
                with pytest.raises(ReadOnlyError, match="refused inside session_scope"):
                    async with async_factory.session_scope(readonly=True) as reader:
                        await reader.execute(text(sql))
            await outer.execute(text("INSERT INTO supplier (name) VALUES ('second half')"))
        async with async_factory.session_scope(readonly=True) as reader:
            return sorted((await reader.scalars(text("SELECT name FROM supplier"))).all())

    assert run(body()) == ["first half", "second half"]
