"""The plugin's fidelity under db_session and its safety catch, run by pytester in a
subprocess against each backend with the toy app of test_testing."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TOY_APP
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Engine
from test_testing import (
    FIRST_REVISION,
    apps_own_database,
    run_inner,
    toy_rows,
    toy_table_dropped_after,
)

pytest_plugins = ["pytester"]

FIDELITY_TESTS = '''
import threading

import pytest
from sqlalchemy import insert, text

import dbsession
import toyapp
from dbsession import DbSessionFactory, ReadOnlyError, on_commit, session_scope
from dbsession.errors import SharedConnectionError


def test_a_read_only_scope_refuses_writes_as_in_production(db_session):
    with pytest.raises(ReadOnlyError):
        with session_scope(readonly=True) as session:
            session.add(toyapp.Item(name="orm write"))
    with pytest.raises(ReadOnlyError):
        with session_scope(readonly=True) as session:
            session.execute(insert(toyapp.Item).values(name="core write"))
    with session_scope(readonly=True) as session:
        assert session.execute(text("SELECT COUNT(*) FROM toy_item")).scalar() == 0
    toyapp.add_item("after")  # the test's transaction is intact
    assert toyapp.names() == ["after"]


def test_a_thread_is_refused_while_another_ones_unit_of_work_is_open(db_session):
    inside, release = threading.Event(), threading.Event()
    errors = []

    def hold():
        with session_scope() as session:
            session.add(toyapp.Item(name="held"))
            inside.set()
            release.wait(30)

    def work(name):
        try:
            toyapp.add_item(name)
        except SharedConnectionError as error:
            errors.append(error)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(30)
    threads = [threading.Thread(target=work, args=(f"thread {i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    release.set()
    holder.join()
    assert len(errors) == 4
    assert "@pytest.mark.dbsession" in str(errors[0])
    worker = threading.Thread(target=toyapp.add_item, args=("one after the other",))
    worker.start()  # alone, as a web framework's thread pool serves one request
    worker.join()
    toyapp.add_item("after")
    assert toyapp.names() == ["after", "held", "one after the other"]


def test_on_commit_hooks_do_not_run_unless_captured(db_session, dbsession_capture_on_commit):
    ran = []

    def register(name):
        with session_scope() as session:
            session.add(toyapp.Item(name=name))
            on_commit(lambda: ran.append(name))

    register("uncaptured")
    assert ran == []
    with dbsession_capture_on_commit() as hooks:
        register("captured")
    assert len(hooks) == 1 and ran == []
    with dbsession_capture_on_commit(execute=True) as hooks:
        register("executed")
        assert ran == []
    assert ran == ["executed"]
    with dbsession_capture_on_commit(execute=True) as hooks:
        with pytest.raises(RuntimeError):
            with session_scope():
                on_commit(lambda: ran.append("rolled back"))
                raise RuntimeError
    assert hooks == [] and ran == ["executed"]


def create_app(url):
    """An app factory as Flask and FastAPI apps write them: global_init at start-up."""
    return DbSessionFactory.global_init(url, pool_pre_ping=False)


def test_an_app_factory_that_calls_global_init_joins_the_test(db_session, dbsession_factory):
    factory = create_app("postgresql://app:secret@production.invalid/app")
    assert factory is dbsession_factory
    with factory.session_scope() as session:
        session.add(toyapp.Item(name="from the app"))
    factory.run_in_transaction(lambda session: session.add(toyapp.Item(name="retried")))
    DbSessionFactory.global_dispose()  # the app's shutdown leaves the plugin's factory alone
    assert toyapp.names() == ["from the app", "retried"]
    assert dbsession.default_factory() is dbsession_factory
'''


@pytest.fixture
def toy_app(pytester: pytest.Pytester, other_connection: Engine) -> Iterator[Engine]:
    """The toy app in pytester's folder; its table dropped afterwards."""
    pytester.makepyfile(toyapp=TOY_APP)
    yield from toy_table_dropped_after(other_connection)


def test_under_db_session_the_app_behaves_as_in_production_and_nothing_stays(
    pytester: pytest.Pytester, backend_url: URL, toy_app: Engine
) -> None:
    pytester.makepyfile(test_fidelity=FIDELITY_TESTS)
    run_inner(pytester, backend_url).assert_outcomes(passed=4)
    assert toy_rows(toy_app) == 0


SAFETY_TESTS = """
import pytest

import toyapp
from dbsession import DbSessionFactory
from dbsession.errors import DatabaseBlockedError


def test_a_test_without_the_database_is_refused():
    with pytest.raises(DatabaseBlockedError, match="db_session fixture"):
        toyapp.add_item("forgot db_session")


def test_global_init_with_the_apps_url_is_refused_too():
    factory = DbSessionFactory.global_init("sqlite:///app-own.db")
    with pytest.raises(DatabaseBlockedError, match="@pytest.mark.dbsession"):
        with factory.session_scope():
            pass


def test_a_factory_made_while_conftest_was_imported_is_the_plugins(db_session, dbsession_factory):
    from conftest import APP_FACTORY

    assert APP_FACTORY is dbsession_factory


@pytest.mark.dbsession
def test_a_marked_test_commits_for_real_to_the_test_database(dbsession_database):
    toyapp.add_item("marked")
    assert toyapp.names() == ["marked"]
"""


@pytest.mark.backends("sqlite")  # about the plugin, not the backend
def test_the_safety_catch_keeps_tests_away_from_the_apps_database(
    pytester: pytest.Pytester,
    backend_url: URL,
    toy_app: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app_db = apps_own_database(pytester, monkeypatch)
    pytester.makepyfile(test_safety=SAFETY_TESTS)
    pytester.makeconftest(
        """
        from dbsession import DbSessionFactory

        APP_FACTORY = DbSessionFactory.global_init()  # an app made at import: DATABASE_URL
        """
    )
    run_inner(pytester, backend_url).assert_outcomes(passed=4)
    assert not app_db.exists()
    assert toy_rows(toy_app) == 1  # the marked test's row: it committed for real

    pytester.makeini("[pytest]\ndbsession_block = false\n")
    pytester.makepyfile(
        test_unblocked="""
        import toyapp

        def test_the_process_default_is_the_apps_again():
            toyapp.Base.metadata.create_all(toyapp.DbSessionFactory.global_init().engine)
            toyapp.add_item("unblocked")
        """
    )
    run_inner(pytester, backend_url, "test_unblocked.py").assert_outcomes(passed=1)
    with create_engine(f"sqlite:///{app_db}").connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM toy_item")) == 1


def _stock_alembic_project(pytester: pytest.Pytester, developer_url: str) -> None:
    """A project set up by ``alembic init`` (the generic template), its alembic.ini
    pointing at the developer's own database, with one revision."""
    from alembic import command
    from alembic.config import Config

    ini = pytester.path / "alembic.ini"
    command.init(Config(str(ini)), str(pytester.path / "migrations"), template="generic")
    ini.write_text(ini.read_text().replace("driver://user:pass@localhost/dbname", developer_url))
    (pytester.path / "migrations" / "versions" / "0001_first.py").write_text(FIRST_REVISION)
    pytester.makepyfile(
        test_migrated="""
        from sqlalchemy import text

        def test_the_migration_ran_on_the_test_database(db_session):
            assert db_session.execute(text("SELECT COUNT(*) FROM migrated")).scalar() == 0
        """
    )


@pytest.mark.backends("sqlite", "postgresql")
def test_a_stock_alembic_env_py_migrates_the_test_database_not_the_developers(
    pytester: pytest.Pytester, backend_url: URL, other_connection: Engine
) -> None:
    developer = pytester.path / "developer.db"
    _stock_alembic_project(pytester, f"sqlite:///{developer}")
    inner = run_inner(pytester, backend_url, "--dbsession-schema=migrations", "test_migrated.py")
    try:
        inner.assert_outcomes(passed=1)
        assert not developer.exists()
        assert "migrated" in inspect(other_connection).get_table_names()
    finally:
        with other_connection.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS migrated"))
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))


@pytest.mark.backends("sqlite")  # about the plugin, not the backend
def test_an_async_driver_url_with_migrations_works(
    pytester: pytest.Pytester, backend_url: URL
) -> None:
    pytest.importorskip("aiosqlite", reason="needs pip install 'sqlalchemy-dbsession[async]'")
    _stock_alembic_project(pytester, f"sqlite:///{pytester.path / 'developer.db'}")
    result = pytester.runpytest_subprocess(
        f"--dbsession-url=sqlite+aiosqlite:///{pytester.path / 'test.db'}",
        "--dbsession-schema=migrations",
        "test_migrated.py",
    )
    result.assert_outcomes(passed=1)


@pytest.mark.backends("sqlite")  # about the plugin, not the backend
def test_an_env_py_that_would_ignore_the_test_url_is_refused_before_it_runs(
    pytester: pytest.Pytester, backend_url: URL
) -> None:
    developer = pytester.path / "developer.db"
    _stock_alembic_project(pytester, f"sqlite:///{developer}")
    env_py = pytester.path / "migrations" / "env.py"
    env_py.write_text(
        textwrap.dedent(
            f"""
            from alembic import context
            from sqlalchemy import create_engine

            with create_engine("sqlite:///{developer}").connect() as connection:
                context.configure(connection=connection)
                with context.begin_transaction():
                    context.run_migrations()
            """
        )
    )
    result = run_inner(pytester, backend_url, "test_migrated.py")
    result.stdout.fnmatch_lines(["*dbsession will not run*env.py*sqlalchemy.url*"])
    assert result.ret != 0
    assert not developer.exists()


def _databases(engine: Engine) -> set[str]:
    query = (
        "SELECT datname FROM pg_database"
        if engine.dialect.name == "postgresql"
        else "SHOW DATABASES"
    )
    with engine.connect() as conn:
        return {str(name) for name in conn.scalars(text(query))}


XDIST_TESTS = """
import pytest
from sqlalchemy import text

import toyapp


@pytest.mark.parametrize("n", range(8))
def test_each_worker_has_a_database_of_its_own(db_session, dbsession_url, worker_id, n):
    assert worker_id in str(dbsession_url.database)
    toyapp.add_item("unique")  # would collide if two workers shared one database
    assert toyapp.names() == ["unique"]
"""


def test_pytest_xdist_gives_each_worker_its_own_database_dropped_at_the_end(
    pytester: pytest.Pytester, backend_url: URL, toy_app: Engine
) -> None:
    pytest.importorskip("xdist", reason="needs pip install 'sqlalchemy-dbsession[test]'")
    pytester.makepyfile(test_xdist=XDIST_TESTS)
    result = run_inner(pytester, backend_url, "-n", "2")
    result.assert_outcomes(passed=8)
    if backend_url.get_backend_name() == "sqlite":
        leftovers = sorted(p.name for p in Path(str(backend_url.database)).parent.iterdir())
        assert not [name for name in leftovers if "_gw" in name]
    else:  # other runs share the server: look only at the names made from ours
        assert not [
            name for name in _databases(toy_app) if name.startswith(f"{backend_url.database}_")
        ]
    assert "toy_item" not in inspect(toy_app).get_table_names()  # the given one is untouched
