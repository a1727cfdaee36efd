"""Issue 12, async side: AUTOCOMMIT refused, a disposed default not made again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dbsession.asyncio import AsyncDbSessionFactory, async_run_in_transaction, async_session_scope
from dbsession.errors import NotInitializedError, UnsupportedIsolationLevelError

from .conftest import Run


def test_autocommit_as_an_async_engine_option_is_refused(
    async_factory: AsyncDbSessionFactory,
) -> None:
    with pytest.raises(UnsupportedIsolationLevelError, match="AUTOCOMMIT"):
        AsyncDbSessionFactory(async_factory.url, isolation_level="AUTOCOMMIT")
    with pytest.raises(UnsupportedIsolationLevelError, match="AUTOCOMMIT"):
        AsyncDbSessionFactory(
            async_factory.url, execution_options={"isolation_level": "AUTOCOMMIT"}
        )


def test_a_late_async_unit_of_work_after_global_dispose_raises_and_creates_nothing(
    async_factory: AsyncDbSessionFactory,
    run: Run[Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere.sqlite3"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{elsewhere}")

    async def body() -> None:
        AsyncDbSessionFactory.global_init(async_factory.url)
        async with async_session_scope() as session:
            await session.connection()
        await AsyncDbSessionFactory.global_dispose()
        with pytest.raises(NotInitializedError, match="global_init"):
            async_session_scope()
        with pytest.raises(NotInitializedError, match="global_init"):
            await async_run_in_transaction(lambda session: session.connection())

    run(body())
    assert not elsewhere.exists()
    assert not (Path.cwd() / "dbsession.sqlite3").exists()
