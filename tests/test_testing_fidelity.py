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


def test_a_read_only_scope_that_caught_a_failed_statement_ends_as_in_production(db_session):
    from sqlalchemy.exc import DBAPIError

    with session_scope(readonly=True) as session:
        try:
            session.execute(text("SELECT 1/0"))
        except DBAPIError:
            pass  # production: the read-only transaction ends, nothing to keep
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
    run_inner(pytester, backend_url).assert_outcomes(passed=5)
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
    result.stdout.fnmatch_lines(["*env.py was about to migrate *developer.db, not the test*"])
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


#: env.py files that take their URL from the app's settings, as the full-stack FastAPI
#: template's does: they ignore both the test URL and the connection handed to them.
APP_SETTINGS_ENV_PY = {
    "set_main_option": """
        from alembic import context
        from sqlalchemy import engine_from_config, pool

        import settings

        config = context.config
        config.set_main_option("sqlalchemy.url", settings.URL)
        section = config.get_section(config.config_ini_section, {})
        engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
        with engine.connect() as connection:
            context.configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
        """,
    "create_engine": """
        from alembic import context
        from sqlalchemy import create_engine

        import settings

        with create_engine(settings.URL).connect() as connection:
            context.configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
        """,
}


@pytest.fixture
def apps_database(
    backend_url: URL, other_connection: Engine, pytester: pytest.Pytester
) -> Iterator[URL]:
    """A second, empty database: the app's own (a SQLite file, or one on the same server)."""
    if backend_url.get_backend_name() == "sqlite":
        yield backend_url.set(database=str(pytester.path / "app-own.db"))
        return
    name = f"{backend_url.database}_app"
    with other_connection.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield backend_url.set(database=name)
    finally:
        with other_connection.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))


@pytest.mark.backends("sqlite", "postgresql")
@pytest.mark.parametrize("pattern", sorted(APP_SETTINGS_ENV_PY))
def test_an_env_py_that_reads_the_apps_settings_cannot_migrate_the_apps_database(
    pytester: pytest.Pytester, backend_url: URL, apps_database: URL, pattern: str
) -> None:
    """The env.py runs, but its connection to another database is refused before it is
    opened (or before any statement), in one line; nothing is created there."""
    _stock_alembic_project(pytester, "sqlite:///unused.db")
    pytester.makepyfile(settings=f"URL = {apps_database.render_as_string(False)!r}\n")
    env_py = pytester.path / "migrations" / "env.py"
    env_py.write_text(textwrap.dedent(APP_SETTINGS_ENV_PY[pattern]))
    result = run_inner(pytester, backend_url, "test_migrated.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*env.py was about to migrate the * database *, not the test*"])
    assert apps_database.password is None or apps_database.password not in result.stdout.str()
    if apps_database.get_backend_name() == "sqlite":
        assert not Path(str(apps_database.database)).exists()
    else:
        app_engine = create_engine(apps_database)
        try:
            assert inspect(app_engine).get_table_names() == []
        finally:
            app_engine.dispose()


FAILING_REVISION = textwrap.dedent(
    """
    from alembic import op

    revision = "0001"
    down_revision = None

    def upgrade():
        with open("migration-runs.txt", "a") as runs:
            runs.write("ran\\n")
        op.execute("THIS IS NOT SQL")
    """
)


@pytest.mark.backends("sqlite")  # about the plugin, not the backend
def test_a_failing_migration_fails_the_run_once_in_one_line(
    pytester: pytest.Pytester, backend_url: URL
) -> None:
    """Ten tests need the database: the migration runs once, and each test's error is the
    same one line, without a traceback."""
    _stock_alembic_project(pytester, "sqlite:///unused.db")
    (pytester.path / "migrations" / "versions" / "0001_first.py").write_text(FAILING_REVISION)
    pytester.makepyfile(
        test_many="""
        import pytest

        @pytest.mark.parametrize("n", range(10))
        def test_needs_the_database(db_session, n):
            pass
        """
    )
    result = run_inner(pytester, backend_url, "test_many.py")
    result.assert_outcomes(errors=10)
    assert (pytester.path / "migration-runs.txt").read_text() == "ran\n"
    output = result.stdout.str()
    failures = [  # each test's report (not the summary's lines, full length when CI is set)
        line
        for line in output.splitlines()
        if "cannot be used: " in line and not line.startswith("ERROR ")
    ]
    assert len(failures) == 10 and len(set(failures)) == 1
    assert "upgrade to head failed in a migration: OperationalError: " in failures[0]
    assert 'near "THIS": syntax error' in failures[0]
    assert "Traceback" not in output and "raise " not in output
    assert len(output.splitlines()) < 10 * 6 + 40  # one short block per test


RUN_WIDE_CONFTEST = '''
import pytest
from sqlalchemy import delete

import toyapp


@pytest.fixture(scope="session")
def seeded(dbsession_factory):
    """Seeded once for the run, committed for real; deleted when the run ends."""
    with dbsession_factory.session_scope() as session:
        session.add_all([toyapp.Item(name="ada"), toyapp.Item(name="grace")])
    yield ["ada", "grace"]
    with dbsession_factory.session_scope() as session:
        session.execute(delete(toyapp.Item))
'''

RUN_WIDE_TESTS = """
import toyapp


def test_the_seeded_rows_are_there(seeded, db_session):
    assert toyapp.names() == seeded


def test_a_test_may_change_them_its_change_is_rolled_back(seeded, db_session):
    db_session.query(toyapp.Item).filter_by(name="ada").delete()
    toyapp.add_item("charles")
    assert toyapp.names() == ["charles", "grace"]


def test_the_next_test_sees_them_as_seeded(seeded, db_session):
    assert toyapp.names() == seeded


def test_the_last_test_does_not_use_the_database():
    pass  # the seed's teardown runs at its end, and may use the database
"""


def test_run_wide_test_data_is_seeded_once_and_gone_after_the_run(
    pytester: pytest.Pytester, backend_url: URL, toy_app: Engine
) -> None:
    pytester.makeconftest(RUN_WIDE_CONFTEST)
    pytester.makepyfile(test_seeded=RUN_WIDE_TESTS)
    run_inner(pytester, backend_url).assert_outcomes(passed=4)
    assert toy_rows(toy_app) == 0
