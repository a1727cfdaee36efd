"""The pytest plugin, run by pytester in a subprocess against each backend with a toy app."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TOY_APP
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Engine

pytest_plugins = ["pytester"]


TESTS = """
import pytest

import toyapp


def test_first_inserts_the_unique_row():
    toyapp.add_item("unique")
    assert toyapp.names() == ["unique"]


def test_second_inserts_the_same_unique_row(db_session):
    toyapp.add_item_on_the_class("unique")
    assert toyapp.names() == ["unique"]


def test_failing_scope_rolls_back_only_itself(db_session):
    toyapp.add_item("kept")
    db_session.add(toyapp.Item(name="from the test"))
    db_session.flush()
    with pytest.raises(RuntimeError, match="payment declined"):
        toyapp.add_item_then_fail("lost")
    assert toyapp.names() == ["from the test", "kept"]
"""

FIRST_REVISION = textwrap.dedent(
    """
    import sqlalchemy as sa
    from alembic import op

    revision = "0001"
    down_revision = None

    def upgrade():
        op.create_table("migrated", sa.Column("id", sa.Integer, primary_key=True))
    """
)

CONFTEST = '''
import pytest


@pytest.fixture(autouse=True)
def _every_test_isolated(db_session):
    """The documented way to isolate every test of a project."""
'''


def write_toy_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(toyapp=TOY_APP, test_app=TESTS)
    pytester.makeconftest(CONFTEST)


def run_inner(pytester: pytest.Pytester, url: URL, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        f"--dbsession-url={url.render_as_string(hide_password=False)}",
        "--dbsession-metadata=toyapp:Base.metadata",
        "-v",
        *args,
    )


def apps_own_database(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point DATABASE_URL at a SQLite file of the app's own (not created); return its path."""
    path = pytester.path / "app-own.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    return path


def toy_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT COUNT(*) FROM toy_item")) or 0)


@pytest.fixture
def toy_project(pytester: pytest.Pytester, other_connection: Engine) -> Iterator[Engine]:
    """The toy app and its tests in pytester's folder; its table dropped afterwards."""
    write_toy_project(pytester)
    yield from toy_table_dropped_after(other_connection)


def toy_table_dropped_after(engine: Engine) -> Iterator[Engine]:
    """Yield ``engine``, then drop the toy app's table (the schema outlives the inner runs)."""
    yield engine
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS toy_item"))


def test_tests_that_insert_the_same_unique_row_pass_in_either_order_and_leave_nothing(
    pytester: pytest.Pytester, backend_url: URL, toy_project: Engine
) -> None:
    forward = run_inner(pytester, backend_url)
    forward.assert_outcomes(passed=3)
    forward.stdout.fnmatch_lines(["*test_first_inserts*", "*test_second_inserts*"])
    backward = run_inner(
        pytester,
        backend_url,
        "test_app.py::test_second_inserts_the_same_unique_row",
        "test_app.py::test_first_inserts_the_unique_row",
    )
    backward.assert_outcomes(passed=2)
    backward.stdout.fnmatch_lines(["*test_second_inserts*", "*test_first_inserts*"])
    assert "toy_item" in inspect(toy_project).get_table_names()
    assert toy_rows(toy_project) == 0


def test_without_the_plugin_the_same_tests_collide(
    pytester: pytest.Pytester, backend_url: URL, toy_project: Engine
) -> None:
    """The control experiment: the toy app really commits, so the isolation is the plugin's."""
    pytester.makeconftest(
        """
        import toyapp
        from dbsession import DbSessionFactory

        def pytest_sessionstart(session):
            toyapp.Base.metadata.create_all(DbSessionFactory.global_init().engine)
        """
    )
    pytester.makepyfile(
        test_plain="""
        import toyapp

        def test_one():
            toyapp.add_item("unique")

        def test_two():
            toyapp.add_item("unique")
        """
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DATABASE_URL", backend_url.render_as_string(hide_password=False))
        result = pytester.runpytest_subprocess("-p", "no:dbsession", "test_plain.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*IntegrityError*"])
    assert toy_rows(toy_project) == 1


def test_fixtures_are_listed_by_pytest_fixtures_with_one_line_each(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest_subprocess("--fixtures")
    names = ("dbsession_url", "dbsession_database", "dbsession_factory", "db_session")
    async_names = ("dbsession_event_loop", "async_dbsession_factory", "async_db_session")
    for name in names + async_names:
        result.stdout.re_match_lines(
            [rf"^{name}\b.* -- .*pytest_dbsession\.py:\d+$", r"^    \S.+$"]
        )
    assert result.ret == 0


def test_importing_dbsession_does_not_import_the_plugin() -> None:
    names = ("dbsession.testing", "pytest_dbsession", "pytest")
    code = f"import sys, dbsession; print(*(name in sys.modules for name in {names}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


UNRELATED_CONFTEST = """
import sys

def pytest_unconfigure(config):
    loaded = [name for name in ("sqlalchemy", "dbsession") if name in sys.modules]
    active = config.pluginmanager.has_plugin("dbsession")
    with open("modules.txt", "w") as out:
        out.write(f"plugin active: {active}; imported: {loaded}")
"""


def test_a_project_that_never_imports_dbsession_never_imports_sqlalchemy(
    pytester: pytest.Pytester,
) -> None:
    """The plugin is active in every project of the environment, and costs one that does
    not use dbsession nothing: neither SQLAlchemy nor dbsession is imported by the end."""
    pytester.makeconftest(UNRELATED_CONFTEST)
    pytester.makepyfile(test_unrelated="def test_x():\n    assert True\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert (pytester.path / "modules.txt").read_text() == "plugin active: True; imported: []"


APP_MADE_AT_IMPORT = """
from dbsession import DbSessionFactory

# An app made when its module is imported, with its own (here unreachable) database:
APP = DbSessionFactory.global_init("postgresql://app:secret@nonexistent.invalid/app")
"""

CATCH_TESTS = """
import pytest

{import_at_top}


def test_without_the_database_the_apps_factory_is_refused():
    import app
    from dbsession.errors import DatabaseBlockedError

    with pytest.raises(DatabaseBlockedError, match="without asking for it"):
        with app.APP.session_scope():
            pass


def test_the_app_made_at_import_has_the_plugins_factory(dbsession_factory):
    import app

    assert app.APP is dbsession_factory
"""


ASYNC_APP_MADE_AT_IMPORT = """
from dbsession.asyncio import AsyncDbSessionFactory

APP = AsyncDbSessionFactory.global_init("postgresql+psycopg://app:secret@nonexistent.invalid/a")
ENGINE = APP.engine  # building is not using: allowed at import
"""

ASYNC_CATCH_TESTS = """
import asyncio

import pytest

{import_at_top}


def test_without_the_database_the_apps_async_factory_is_refused():
    import app
    from dbsession.errors import DatabaseBlockedError

    async def unit():
        async with app.APP.session_scope():
            pass

    with pytest.raises(DatabaseBlockedError, match="without asking for it"):
        asyncio.run(unit())


def test_the_async_app_made_at_import_has_the_plugins_factory(async_dbsession_factory):
    import app

    assert app.APP is async_dbsession_factory
"""


def run_the_catch(
    pytester: pytest.Pytester, app: str, tests: str, first_import: str, module: str
) -> None:
    """Run ``tests`` on the project module ``app``; ``module`` (dbsession's) is first
    imported where ``first_import`` says. Both tests must pass."""
    pytester.makepyfile(app=app, early_plugin=f"import {module}")
    args: list[str] = []
    if first_import == "conftest":
        pytester.makeconftest("import app")
    elif first_import == "-p plugin":
        args = ["-p", "early_plugin"]
    top = "import app" if first_import in ("test module", "-p plugin") else ""
    pytester.makepyfile(test_catch=tests.format(import_at_top=top))
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)


@pytest.mark.parametrize("first_import", ["conftest", "test module", "test body", "-p plugin"])
def test_the_catch_holds_wherever_dbsession_is_first_imported(
    pytester: pytest.Pytester, first_import: str
) -> None:
    """The plugin pins its factory the moment dbsession is imported (in a conftest.py, a
    test module, a test), or at start-up when another plugin (``-p``) imported it before:
    an app that calls global_init() at import gets the plugin's factory in every case."""
    run_the_catch(pytester, APP_MADE_AT_IMPORT, CATCH_TESTS, first_import, "dbsession")


@pytest.mark.parametrize("first_import", ["conftest", "test module", "-p plugin"])
def test_the_catch_holds_for_an_async_app_made_at_import(
    pytester: pytest.Pytester, first_import: str
) -> None:
    """The async default is pinned the moment dbsession.asyncio is imported too."""
    run_the_catch(
        pytester, ASYNC_APP_MADE_AT_IMPORT, ASYNC_CATCH_TESTS, first_import, "dbsession.asyncio"
    )


def test_a_test_url_that_cannot_be_parsed_fails_every_import_of_dbsession(
    pytester: pytest.Pytester,
) -> None:
    """Not only the first: no module gets dbsession without the catch."""
    uses_the_default = "import dbsession\n\ndef test_x():\n    dbsession.default_factory()\n"
    pytester.makepyfile(test_a=uses_the_default, test_b=uses_the_default)
    result = pytester.runpytest_subprocess("--dbsession-url=postgresql://u:hunter2@h:port/db")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*InvalidURLError*cannot be parsed*"])
    assert "hunter2" not in result.stdout.str() + result.stderr.str()


def test_naming_dbsession_testing_as_the_plugin_loads_the_entry_module_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With plugin autoloading off, ``-p dbsession.testing`` (the plugin module before
    issue 19) still gives the fixtures and the catch."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(app=APP_MADE_AT_IMPORT)
    pytester.makeconftest("import app")
    pytester.makepyfile(test_catch=CATCH_TESTS.format(import_at_top=""))
    pytester.runpytest_subprocess("-p", "dbsession.testing").assert_outcomes(passed=2)
    pytester.runpytest_subprocess("-p", "dbsession").assert_outcomes(passed=2)


def test_schema_from_the_projects_migrations_when_it_has_them(
    pytester: pytest.Pytester,
) -> None:
    """auto finds alembic.ini in the rootdir and migrates the temporary SQLite file."""
    pytester.makefile(
        ".ini",
        alembic=textwrap.dedent(
            """
            [alembic]
            script_location = %(here)s/migrations
            """
        ),
    )
    versions = pytester.mkdir("migrations") / "versions"
    versions.mkdir()
    (pytester.path / "migrations" / "env.py").write_text(
        "from dbsession.migrations import run_env\nrun_env()\n"
    )
    (versions / "0001_first.py").write_text(FIRST_REVISION)
    pytester.makepyfile(
        test_migrated="""
        from sqlalchemy import text

        def test_table_from_the_migration_exists(db_session):
            assert db_session.execute(text("SELECT COUNT(*) FROM migrated")).scalar() == 0
            version = db_session.execute(text("SELECT version_num FROM alembic_version"))
            assert version.scalar() == "0001"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


ENGINE_AT_IMPORT = """
from dbsession import DbSessionFactory

APP = DbSessionFactory.global_init("postgresql://app:secret@nonexistent.invalid/app")
ENGINE = APP.engine  # building an engine is not using the database
"""

ENGINE_TESTS = """
import pytest
from sqlalchemy import text

import app
from dbsession.errors import DatabaseBlockedError


def test_a_connection_of_the_engine_built_at_import_is_refused():
    with pytest.raises(DatabaseBlockedError, match="without asking for it"):
        app.ENGINE.connect()


def test_so_is_a_unit_of_work():
    with pytest.raises(DatabaseBlockedError, match="db_session fixture"):
        with app.APP.session_scope():
            pass


def test_a_test_that_asked_connects(db_session):
    with app.ENGINE.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
    assert app.ENGINE.url == db_session.get_bind().engine.url
"""


def test_building_the_engine_at_import_is_not_refused_connecting_is(
    pytester: pytest.Pytester,
) -> None:
    """An app that builds its engine when a conftest imports it: the build is not a use."""
    pytester.makepyfile(app=ENGINE_AT_IMPORT, test_engine=ENGINE_TESTS)
    pytester.makeconftest("import app")
    pytester.runpytest_subprocess().assert_outcomes(passed=3)


SEAM = """
import pytest
from sqlalchemy import text

from dbsession import DbSessionFactory, default_factory, on_commit, session_scope
from dbsession.errors import DatabaseBlockedError


def test_pin_block_and_bound_to_are_all_a_harness_needs(tmp_path):
    mine = DbSessionFactory(f"sqlite:///{tmp_path / 'harness.db'}")
    registry = DbSessionFactory.registry
    reason = ["closed for the test"]
    with registry.pin(mine), registry.block(lambda: reason[0]):
        assert DbSessionFactory.global_init("sqlite:///elsewhere.db") is mine
        DbSessionFactory.global_dispose()  # leaves a pinned default alone
        assert default_factory() is mine
        engine = mine.engine  # built, though blocked
        with pytest.raises(DatabaseBlockedError, match="closed for the test"):
            engine.connect()
        with pytest.raises(DatabaseBlockedError, match="closed for the test"):
            session_scope()
        reason[0] = None
        with engine.connect() as connection:
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
            connection.commit()
            transaction = connection.begin()
            hooks = []
            with mine.bound_to(connection, on_commit=hooks.extend):
                with session_scope() as session:  # a SAVEPOINT of the outer transaction
                    session.execute(text("INSERT INTO t VALUES (1)"))
                    on_commit(print)
            assert hooks == [print]
            assert connection.execute(text("SELECT COUNT(*) FROM t")).scalar() == 1
            transaction.rollback()
            assert connection.execute(text("SELECT COUNT(*) FROM t")).scalar() == 0
    mine.dispose()
"""


def test_the_public_seam_of_the_process_default(pytester: pytest.Pytester) -> None:
    """Registry.pin, Registry.block and bound_to, used as a harness other than
    dbsession's plugin would (the plugin itself turned off)."""
    pytester.makepyfile(test_seam=SEAM)
    pytester.runpytest_subprocess("-p", "no:dbsession").assert_outcomes(passed=1)


def test_dbsession_does_not_know_its_plugin() -> None:
    """No module of the library names the plugin's module: the plugin watches dbsession."""
    package = Path(__file__).resolve().parents[1] / "dbsession"
    naming = [
        path.name
        for path in package.rglob("*.py")
        if path.name != "testing.py" and "pytest_dbsession" in path.read_text()
    ]
    assert naming == []
