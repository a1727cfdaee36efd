"""The plugin's async fixtures, run by pytester in a subprocess against each backend with an
async toy app; no pytest-asyncio or anyio plugin takes part."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import TOY_APP
from sqlalchemy.engine import URL, Engine
from test_testing import (
    apps_own_database,
    run_inner,
    toy_rows,
    toy_table_dropped_after,
)

from .conftest import _require_async_drivers

pytest_plugins = ["pytester"]

ASYNC_TOY_APP = '''
"""The async toy app: its coroutines commit inside dbsession's async_session_scope()."""

from sqlalchemy import select

from dbsession.asyncio import AsyncDbSessionFactory, async_session_scope
from toyapp import Item


async def add_item(name):
    async with async_session_scope() as session:
        session.add(Item(name=name))


async def add_item_on_the_class(name):
    async with async_session_scope() as session:
        session.add(Item(name=name))


async def add_item_then_fail(name):
    async with async_session_scope() as session:
        session.add(Item(name=name))
        await session.flush()
        raise RuntimeError("payment declined")


async def names():
    async with async_session_scope() as session:
        return sorted(await session.scalars(select(Item.name)))
'''

ASYNC_TESTS = """
import pytest

import asynctoyapp
from toyapp import Item


async def test_first_inserts_the_unique_row(async_db_session):
    await asynctoyapp.add_item("unique")
    assert await asynctoyapp.names() == ["unique"]


async def test_second_inserts_the_same_unique_row(async_db_session):
    await asynctoyapp.add_item_on_the_class("unique")
    assert await asynctoyapp.names() == ["unique"]


async def test_failing_scope_rolls_back_only_itself(async_db_session):
    await asynctoyapp.add_item("kept")
    async_db_session.add(Item(name="from the test"))
    await async_db_session.flush()
    with pytest.raises(RuntimeError, match="payment declined"):
        await asynctoyapp.add_item_then_fail("lost")
    assert await asynctoyapp.names() == ["from the test", "kept"]


def test_a_sync_test_drives_the_app_on_the_plugins_loop(async_db_session, dbsession_event_loop):
    dbsession_event_loop.run_until_complete(asynctoyapp.add_item("unique"))
    assert dbsession_event_loop.run_until_complete(asynctoyapp.names()) == ["unique"]
"""


@pytest.fixture
def async_toy_project(pytester: pytest.Pytester, other_connection: Engine) -> Iterator[Engine]:
    """The async toy app and its tests in pytester's folder; its table dropped afterwards."""
    _require_async_drivers()
    pytester.makepyfile(toyapp=TOY_APP, asynctoyapp=ASYNC_TOY_APP, test_async_app=ASYNC_TESTS)
    yield from toy_table_dropped_after(other_connection)


def test_async_tests_that_insert_the_same_unique_row_pass_in_either_order_and_leave_nothing(
    pytester: pytest.Pytester, backend_url: URL, async_toy_project: Engine
) -> None:
    forward = run_inner(pytester, backend_url)
    forward.assert_outcomes(passed=4)
    backward = run_inner(
        pytester,
        backend_url,
        "test_async_app.py::test_second_inserts_the_same_unique_row",
        "test_async_app.py::test_a_sync_test_drives_the_app_on_the_plugins_loop",
        "test_async_app.py::test_first_inserts_the_unique_row",
    )
    backward.assert_outcomes(passed=3)
    backward.stdout.fnmatch_lines(
        ["*test_second_inserts*PASSED*", "*test_a_sync_test*PASSED*", "*test_first_inserts*PASSED*"]
    )
    assert toy_rows(async_toy_project) == 0


@pytest.mark.backends("sqlite")  # about the plugin, not the backend
def test_a_test_marked_for_another_async_runner_is_refused_with_the_fix(
    pytester: pytest.Pytester, backend_url: URL, async_toy_project: Engine
) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    asyncio: run by pytest-asyncio\n")
    pytester.makepyfile(
        test_marked="""
        import pytest

        @pytest.mark.asyncio
        async def test_marked(async_db_session):
            pass
        """
    )
    result = run_inner(pytester, backend_url, "test_marked.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*marked 'asyncio'*Remove the mark*"])


@pytest.mark.backends("sqlite")  # about the plugin, not the backend
def test_sync_tests_never_import_the_async_side(
    pytester: pytest.Pytester, backend_url: URL, async_toy_project: Engine
) -> None:
    pytester.makepyfile(
        test_sync_only="""
        import sys

        import toyapp

        ASYNC = {"dbsession.asyncio", "sqlalchemy.ext.asyncio", "aiosqlite", "aiomysql"}

        def test_sync(db_session):
            toyapp.add_item("unique")
            assert not ASYNC & set(sys.modules)
        """
    )
    run_inner(pytester, backend_url, "test_sync_only.py").assert_outcomes(passed=1)
    code = "import sys, dbsession.testing; print(sorted(m for m in sys.modules if 'aio' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]"]


CONCURRENT_TESTS = """
import asyncio

import pytest

import asynctoyapp
from dbsession import ReadOnlyError, on_commit
from dbsession.asyncio import async_session_scope
from dbsession.errors import SharedConnectionError
from toyapp import Item


async def test_two_scopes_under_gather_one_is_refused_the_other_commits(async_db_session):
    results = await asyncio.gather(
        asynctoyapp.add_item("first"), asynctoyapp.add_item("second"), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, SharedConnectionError)]
    assert len(refused) == 1 and results.count(None) == 1
    assert "@pytest.mark.dbsession" in str(refused[0])
    assert len(await asynctoyapp.names()) == 1  # the connection is intact


async def test_tasks_awaited_one_after_the_other_share_the_test(async_db_session):
    await asyncio.create_task(asynctoyapp.add_item("one"))
    await asyncio.create_task(asynctoyapp.add_item("two"))
    assert await asynctoyapp.names() == ["one", "two"]


async def test_a_read_only_scope_refuses_writes(async_db_session):
    with pytest.raises(ReadOnlyError):
        async with async_session_scope(readonly=True) as session:
            session.add(Item(name="refused"))
    await asynctoyapp.add_item("after")
    assert await asynctoyapp.names() == ["after"]


async def test_on_commit_hooks_are_captured(async_db_session, dbsession_capture_on_commit):
    ran = []
    with dbsession_capture_on_commit(execute=True) as hooks:
        async with async_session_scope() as session:
            session.add(Item(name="hooked"))
            on_commit(lambda: ran.append("hook"))
        assert ran == [] and len(hooks) == 1
    assert ran == ["hook"]
"""


def test_async_fidelity_concurrent_tasks_read_only_and_hooks(
    pytester: pytest.Pytester, backend_url: URL, async_toy_project: Engine
) -> None:
    pytester.makepyfile(test_concurrent=CONCURRENT_TESTS)
    run_inner(pytester, backend_url, "test_concurrent.py").assert_outcomes(passed=4)
    assert toy_rows(async_toy_project) == 0


@pytest.mark.backends("sqlite")  # about the plugin, not the backend
def test_an_async_test_without_the_database_is_refused(
    pytester: pytest.Pytester,
    backend_url: URL,
    async_toy_project: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app_db = apps_own_database(pytester, monkeypatch)
    pytester.makepyfile(
        test_forgot="""
        import asyncio

        import pytest

        import asynctoyapp
        from dbsession.errors import DatabaseBlockedError

        def test_forgot_async_db_session():
            with pytest.raises(DatabaseBlockedError, match="async_db_session"):
                asyncio.run(asynctoyapp.add_item("forgot"))
        """
    )
    run_inner(pytester, backend_url, "test_forgot.py").assert_outcomes(passed=1)
    assert not app_db.exists()
