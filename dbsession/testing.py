"""The pytest plugin's implementation: the test URL, the plugin's factories, the gate's
check, the rolled-back sessions.

The plugin itself (options, mark, hooks, the fixtures pytest lists) is the top-level
module ``pytest_dbsession``, registered through the ``pytest11`` entry point; it imports
only pytest, and imports this module (and so SQLAlchemy) when dbsession is imported during
the run or a test first uses a fixture. ``import dbsession`` never imports this module.

This module is no plugin of its own: naming it to pytest (``-p dbsession.testing``,
``pytest_plugins = ["dbsession.testing"]``), as one could when it was the plugin, loads
``pytest_dbsession`` (see ``pytest_plugins`` below), which is what ``-p dbsession`` does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from pytest_dbsession import DEFAULT_METADATA, SCHEMA_CHOICES, URL_ENV, Gate

from ._config import async_twin, first_line, mask_url, resolve_url, sync_twin
from ._context import Hook
from ._errors import (
    DbSessionError,
    MigrationError,
    MigrationsNotFoundError,
    SharedConnectionError,
)
from ._factory import DbSessionFactory
from ._lifecycle import LazyFactory

if TYPE_CHECKING:  # the async side is imported only when its fixtures are used
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import AsyncSession

    from .asyncio import AsyncDbSessionFactory

#: Naming this module to pytest as a plugin loads the plugin's entry module instead.
pytest_plugins: list[str] = ["pytest_dbsession"]


def _setting(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


# ---------------------------------------------------------------------------------------
# The run's state: the test URL, the plugin's factories, and whether the database is open.


class _Run:
    """What the plugin keeps for one run (one xdist worker): the URL, its factories, the
    process defaults it pinned, and why the test database cannot be used if it cannot
    (``failure``, one line, found once for the whole run). ``gate`` tells which test runs
    now and whether it asked for the database. Made, and with the catch on the factory
    pinned and blocked (``Registry.pin``, ``Registry.block``), when dbsession is imported
    during the run (``pytest_dbsession._ImportWatch``)."""

    def __init__(self, config: pytest.Config, gate: Gate) -> None:
        self.gate = gate
        self.block = gate.block
        self.worker = os.environ.get("PYTEST_XDIST_WORKER")
        self._tmp: str | None = None
        self._stack = ExitStack()
        self.connections = _Connections()
        self.failure: str | None = None
        self.url, self.created = self._choose_url(config)
        self.factory = DbSessionFactory(sync_twin(self.url))
        self.async_factory: AsyncDbSessionFactory | None = None
        self._catch(DbSessionFactory.registry, self.factory)

    def _catch(self, registry: Any, factory: Any) -> None:
        """With the catch on: ``factory`` is the process default for the whole run, and
        refuses to connect while the gate is closed."""
        if self.block:
            self._stack.enter_context(registry.pin(factory))
            self._stack.enter_context(registry.block(self.gate.refusal))

    def _choose_url(self, config: pytest.Config) -> tuple[URL, bool]:
        """The test URL, and whether the plugin must create (and drop) that database."""
        given = _given_url(config)
        if not given:
            self._tmp = tempfile.mkdtemp(prefix="dbsession-")
            return URL.create("sqlite", database=str(Path(self._tmp) / "test.db")), False
        url = resolve_url(given)[0]
        if self.worker is None:
            return url, False
        if url.get_backend_name() == "sqlite":
            path = Path(url.database or "")
            if not url.database or url.database.startswith("file:") or url.database == ":memory:":
                return url, False
            return url.set(
                database=str(path.with_name(f"{path.stem}_{self.worker}{path.suffix}"))
            ), False
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")[:8]
        return url.set(database=f"{url.database}_{run}_{self.worker}"), True

    def async_default(self) -> AsyncDbSessionFactory:
        """The plugin's AsyncDbSessionFactory (made, and pinned as the default, on first use)."""
        if self.async_factory is None:
            from .asyncio import AsyncDbSessionFactory

            self.async_factory = AsyncDbSessionFactory(async_twin(self.url))
            self._catch(AsyncDbSessionFactory.registry, self.async_factory)
        return self.async_factory

    def close(self) -> None:
        """Unpin the defaults, dispose the sync engine and remove the temporary folder."""
        self._stack.close()
        self.factory.dispose()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _given_url(config: pytest.Config) -> str | None:
    """--dbsession-url (also before the command line is fully parsed), else DBSESSION_TEST_URL."""
    early = getattr(config, "known_args_namespace", None)
    given = config.getoption("dbsession_url", None) or getattr(early, "dbsession_url", None)
    return str(given) if given else os.environ.get(URL_ENV)


# ---------------------------------------------------------------------------------------
# The database: its URL (one per xdist worker), its schema, its factories.


def _database_url(run: _Run, pytestconfig: pytest.Config) -> Iterator[URL]:
    """The ``dbsession_url`` fixture: the run's URL; under pytest-xdist a server database
    of the worker's own is created here and dropped at the end, through dbsession's own
    engine (its connector masks the password in every error)."""
    __tracebackhide__ = True
    if not run.created:
        yield run.url
        if run.worker is not None and run.url.get_backend_name() == "sqlite" and run.url.database:
            run.factory.dispose()
            Path(run.url.database).unlink(missing_ok=True)
        return
    _fail_if_failed(run)
    admin = DbSessionFactory(
        sync_twin(resolve_url(_given_url(pytestconfig))[0]), poolclass=NullPool
    )
    name = admin.engine.dialect.identifier_preparer.quote(str(run.url.database))
    try:
        failed = _admin(admin, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
        if failed is not None:
            _fail(run, pytestconfig, run.url, failed)
        yield run.url
    finally:
        run.factory.dispose()
        force = " WITH (FORCE)" if admin.engine.dialect.name == "postgresql" else ""
        dropped = None if run.failure else _admin(admin, f"DROP DATABASE IF EXISTS {name}{force}")
        admin.dispose()
        if dropped is not None:
            raise dropped


def _admin(admin: DbSessionFactory, *statements: str) -> Exception | None:
    """Run ``statements`` outside any transaction; return the error that stopped them."""
    try:
        with admin.engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            for statement in statements:
                connection.execute(text(statement))
    except Exception as error:  # told in one line by _fail, or raised at the end
        return error
    return None


def _prepared_database(run: _Run, dbsession_url: URL, pytestconfig: pytest.Config) -> URL:
    """The ``dbsession_database`` fixture: a database that cannot be used fails the test
    with one line naming the setting it came from (no traceback, no password); found
    once, it fails every later test that needs the database with the same line."""
    __tracebackhide__ = True
    _fail_if_failed(run)
    try:
        return _prepare(dbsession_url, pytestconfig)
    except pytest.UsageError:
        raise
    except Exception as error:
        failed = error
    _fail(run, pytestconfig, dbsession_url, failed)  # outside except: no chained context


def _fail_if_failed(run: _Run) -> None:
    __tracebackhide__ = True
    if run.failure is not None:
        pytest.fail(run.failure, pytrace=False)


def _fail(run: _Run, pytestconfig: pytest.Config, url: URL, error: Exception) -> NoReturn:
    """Fail the test, and every later one that needs the database, with one line."""
    __tracebackhide__ = True
    given = pytestconfig.getoption("dbsession_url")
    where = "--dbsession-url" if given else URL_ENV if os.environ.get(URL_ENV) else "default"
    reason = first_line(error, url)
    if not isinstance(error, DbSessionError):  # a migration's own error, say
        reason = f"{type(error).__name__}: {reason}"
    run.failure = (
        f"dbsession: the test database {mask_url(url)} (from {where}) cannot be used: {reason}"
    )
    pytest.fail(run.failure, pytrace=False)


def _prepare(dbsession_url: URL, pytestconfig: pytest.Config) -> URL:
    schema = _setting(pytestconfig, "dbsession_schema") or "auto"
    if schema not in SCHEMA_CHOICES:
        raise pytest.UsageError(
            f"--dbsession-schema={schema!r} is not one of {', '.join(SCHEMA_CHOICES)}."
        )
    if schema == "none":
        _check_reachable(dbsession_url)
        return dbsession_url
    from . import migrations  # Alembic is only imported when a database is prepared

    url = sync_twin(dbsession_url)  # Alembic and create_all run outside any event loop
    if schema in ("auto", "migrations"):
        location = _migrations_location(pytestconfig)
        try:
            config = migrations.make_config(location, url=url)
        except MigrationsNotFoundError:
            if schema == "migrations":
                raise
        else:
            _migrate_test_database(config, url)
            return dbsession_url
    metadata = migrations.load_metadata(
        _setting(pytestconfig, "dbsession_metadata") or DEFAULT_METADATA
    )
    factory = DbSessionFactory(url)
    try:
        metadata.create_all(factory.engine)
    finally:
        factory.dispose()
    return dbsession_url


def _migrate_test_database(config: Config, url: URL) -> None:
    """Upgrade the test database, and only it, to head, whatever the project's env.py.

    As Alembic's cookbook does, env.py is handed the connection to migrate
    (``config.attributes["connection"]``, which dbsession's ``run_env()`` uses), with
    ``sqlalchemy.url`` and ``DATABASE_URL`` set to the test URL for an env.py that
    builds its own engine. While it runs, every connection opened and every statement
    sent, by any engine of the process, must be for the test database: anything else
    (an env.py that reads the app's settings) raises MigrationError before it connects
    or runs a statement, so nothing reaches another database.
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    from . import migrations

    env_py = Path(ScriptDirectory.from_config(config).dir) / "env.py"
    config.set_main_option(
        "sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%")
    )
    factory = DbSessionFactory(url, poolclass=NullPool)
    saved = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = url.render_as_string(hide_password=False)
    try:
        with (
            _only_into(url, env_py),
            factory.engine.connect() as connection,
            migrations.migration_lock(connection),
        ):
            config.attributes["connection"] = connection
            failed: str | None = None
            try:
                migrations.run_command(command.upgrade, config, "head")
            except DbSessionError:
                raise
            except Exception as error:  # a migration's own: SQL, Python
                failed = f"{type(error).__name__}: {first_line(error, url)}"
            else:
                if connection.in_transaction():
                    connection.commit()
        if failed is not None:
            raise MigrationError(
                f"upgrade to head failed in a migration: {failed} (run the migrations on "
                "that database yourself to see the traceback)"
            )
    finally:
        factory.dispose()
        if saved is None:
            del os.environ["DATABASE_URL"]
        else:
            os.environ["DATABASE_URL"] = saved
    head = ScriptDirectory.from_config(config).get_current_head()
    if migrations.current(url=url) != head:
        raise MigrationError(
            f"{env_py} ran but the test database {mask_url(url)} is not at the head "
            f"revision {head}. Make it migrate config.attributes['connection'] (as "
            "dbsession's run_env() does) or config.get_main_option('sqlalchemy.url')."
        )


#: The connect arguments that say which database a connection is for.
_ADDRESS = ("host", "port", "dbname", "database", "db", "unix_socket")


@contextmanager
def _only_into(url: URL, env_py: Path) -> Iterator[None]:
    """While the block runs, refuse (MigrationError) a connection opened for, and a
    statement sent to, any other database than ``url``'s, by any engine."""

    def refuse(target: str) -> NoReturn:
        raise MigrationError(
            f"{env_py} was about to migrate {target}, not the test database "
            f"{mask_url(url)}; nothing was run there. Make it use "
            "config.attributes['connection'] (dbsession's run_env() does) or "
            "config.get_main_option('sqlalchemy.url'), which dbsession sets to the test "
            "database, instead of the app's settings."
        )

    def before_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        same = dialect.name == url.get_dialect().name
        if same:
            expected = dialect.create_connect_args(
                url.set(drivername=f"{dialect.name}+{dialect.driver}")
            )
            same = _address(*expected) == _address(cargs, cparams)
        if not same:
            refuse(_describe(dialect.name, cargs, cparams))

    def before_statement(connection: Any, *args: Any) -> None:
        if not _same_database(connection.engine.url, url):
            refuse(mask_url(connection.engine.url))

    event.listen(Engine, "do_connect", before_connect)
    event.listen(Engine, "before_cursor_execute", before_statement)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", before_statement)
        event.remove(Engine, "do_connect", before_connect)


def _address(cargs: Any, cparams: Any) -> tuple[Any, ...]:
    """Which database a driver's connect arguments name (SQLite: the file's real path)."""
    files = [
        os.path.realpath(arg) if isinstance(arg, str) and arg != ":memory:" else arg
        for arg in cargs
    ]
    return (*files, *(str(cparams.get(key)) for key in _ADDRESS))


def _describe(backend: str, cargs: Any, cparams: Any) -> str:
    """A connection's target for a message: the file, or host, port and database."""
    if cargs:
        return f"the {backend} database {cargs[0]}"
    where = {key: cparams[key] for key in _ADDRESS if cparams.get(key) is not None}
    return f"the {backend} database " + ", ".join(f"{k}={v}" for k, v in where.items())


def _same_database(one: URL, other: URL) -> bool:
    """Whether two URLs name the same database (drivers, users and options aside)."""

    def where(url: URL) -> tuple[Any, ...]:
        backend = url.get_backend_name()
        database = url.database
        if (
            backend == "sqlite"
            and database
            and database != ":memory:"
            and not database.startswith("file:")
        ):
            database = os.path.realpath(database)
        port = url.port or {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(backend)
        return backend, url.host or "localhost", port, database

    return where(one) == where(other)


def _check_reachable(url: URL) -> None:
    factory = DbSessionFactory(sync_twin(url))
    try:
        factory.engine.connect().close()
    finally:
        factory.dispose()


def _migrations_location(config: pytest.Config) -> Path | None:
    """The explicit setting, else alembic.ini or migrations/ in the rootdir (None: look in cwd)."""
    explicit = _setting(config, "dbsession_migrations")
    if explicit:
        return Path(explicit)
    if os.environ.get("DBSESSION_MIGRATIONS"):
        return None
    for candidate in (config.rootpath / "alembic.ini", config.rootpath / "migrations"):
        if candidate.is_file() or (candidate / "env.py").is_file():
            return candidate
    return None


def _sync_factory(run: _Run) -> Iterator[DbSessionFactory]:
    """The ``dbsession_factory`` fixture: the run's factory, disposed at the end."""
    __tracebackhide__ = True
    yield run.factory
    run.connections.release(run.factory, _as_is)
    run.factory.dispose()


# ---------------------------------------------------------------------------------------
# One test: its rolled-back transaction, who may use its connection, its on_commit hooks.


class _Hooks:
    """The ``on_commit`` hooks of the units of work committed inside one test's
    transaction: dropped, unless a ``dbsession_capture_on_commit`` block is open."""

    def __init__(self) -> None:
        self.captures: list[list[Hook]] = []

    def divert(self, hooks: list[Hook]) -> None:
        """Receive the hooks of one committed unit of work (see ``run_hooks``)."""
        for captured in self.captures:
            captured.extend(hooks)

    @contextmanager
    def capture(self, *, execute: bool = False) -> Iterator[list[Hook]]:
        """Collect the hooks registered in the block; with ``execute``, run them at its
        end (and those they register), in order, letting their exceptions propagate."""
        captured: list[Hook] = []
        self.captures.append(captured)
        try:
            yield captured
            done = 0
            while execute and done < len(captured):
                captured[done]()
                done += 1
        finally:
            self.captures.remove(captured)


class _OneUser:
    """Who may have a session on the test's connection: one thread or asyncio task at a
    time. A DBAPI connection serves one caller; two units of work open at once would
    interleave their SAVEPOINTs, or their packets (MariaDB: a corrupt protocol). A
    thread or task that comes while another one's session is in a transaction is
    refused; one that comes after it ended (a request that FastAPI runs in its thread
    pool while the test waits for the response) is served."""

    def __init__(self, fixture: str) -> None:
        self._fixture = fixture
        self._lock = threading.Lock()
        self._users: list[tuple[_Owner, Any]] = []

    def admit(self, session: Any) -> None:
        """Record ``session`` (``bound_to``'s ``on_session``). Raises
        SharedConnectionError when another thread or task has a session in use."""
        owner = _owner()
        with self._lock:
            self._users = [(o, s) for o, s in self._users if not _finished(o, s)]
            other = next((o for o, _ in self._users if o != owner), None)
            if other is not None:
                kind = "thread" if other[0] != owner[0] else "asyncio task"
                raise SharedConnectionError(
                    f"A {kind} asked for a session while another {kind}'s unit of work is "
                    f"open on the test's one connection ({self._fixture}): two at once would "
                    "interleave on it. Let them run one after the other, or drop "
                    f"{self._fixture} and mark the test @pytest.mark.dbsession: every "
                    f"{kind} then gets a session of its own that commits for real."
                )
            self._users.append((owner, session))

    def forget(self, session: Any) -> None:
        """Stop counting ``session`` as a user (the fixture's own, used by the test)."""
        with self._lock:
            self._users = [(o, s) for o, s in self._users if s is not session]


_Owner = tuple[int, "asyncio.Task[Any] | None"]


def _owner() -> _Owner:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running in this thread
        task = None
    return threading.get_ident(), task


def _finished(owner: _Owner, session: Any) -> bool:
    """A user is done when its task is, or when its session is in no transaction: its
    unit of work committed or rolled back (a session that has not begun one yet has sent
    nothing on the connection)."""
    task = owner[1]
    return (task is not None and task.done()) or not session.in_transaction()


_HOOKS = pytest.StashKey[_Hooks]()


def _hooks_of(request: pytest.FixtureRequest) -> _Hooks:
    """The on_commit hooks of the running test's units of work (one object per test)."""
    stash: pytest.Stash = request.node.stash
    if _HOOKS not in stash:
        stash[_HOOKS] = _Hooks()
    return stash[_HOOKS]


def _sync_session(
    request: pytest.FixtureRequest, dbsession_factory: DbSessionFactory, run: _Run
) -> Iterator[Session]:
    """The ``db_session`` fixture (see ``_rolled_back_session``)."""
    __tracebackhide__ = True
    yield from _rolled_back_session(
        dbsession_factory, _as_is, _hooks_of(request), "db_session", run.connections
    )


def _as_is(value: Any) -> Any:
    return value


class _Connections:
    """The connection each factory's tests run on, kept checked out from one test to the
    next (each test begins and rolls back its own transaction on it), so a test costs
    no pool checkout, pre-ping and checkin; replaced if it was closed or invalidated."""

    def __init__(self) -> None:
        self._held: dict[int, Any] = {}

    def of(self, factory: LazyFactory[Any], run: Callable[[Any], Any]) -> Any:
        """The connection of ``factory``'s tests (``run`` as in ``_rolled_back_session``)."""
        held = self._held.get(id(factory))
        if held is None or held.closed or held.invalidated:
            engine: Any = factory.engine  # type: ignore[attr-defined]
            held = self._held[id(factory)] = run(engine.connect())
        return held

    def release(self, factory: LazyFactory[Any], run: Callable[[Any], Any]) -> None:
        """Close ``factory``'s connection (before the factory is disposed)."""
        held = self._held.pop(id(factory), None)
        if held is not None:
            run(held.close())


def _rolled_back_session(
    factory: LazyFactory[Any],
    run: Callable[[Any], Any],
    hooks: _Hooks,
    fixture: str,
    connections: _Connections,
) -> Iterator[Any]:
    """Yield a session of ``factory`` in an outer transaction on one connection, rolled
    back afterwards, while ``factory`` is the process default and every session it makes
    joins that transaction (``factory.bound_to``).

    One body for both sides: ``run`` is the identity on the sync side and runs the
    coroutine to completion on the plugin's event loop on the async side.
    """
    __tracebackhide__ = True
    connection = connections.of(factory, run)
    users = _OneUser(fixture)
    try:
        run(connection.begin())
        pinned = type(factory).registry.pin(factory)
        bound = factory.bound_to(connection, on_commit=hooks.divert, on_session=users.admit)
        with pinned, bound:
            session = factory.create_session()  # type: ignore[attr-defined]
            users.forget(session)
            try:
                yield session
            finally:
                run(session.close())
    finally:
        if connection.in_transaction():
            run(connection.rollback())


def _async_factory(
    run: _Run, dbsession_event_loop: asyncio.AbstractEventLoop
) -> Iterator[AsyncDbSessionFactory]:
    """The ``async_dbsession_factory`` fixture: the run's async factory, disposed at the end."""
    factory = run.async_default()
    yield factory
    run.connections.release(factory, dbsession_event_loop.run_until_complete)
    dbsession_event_loop.run_until_complete(factory.dispose())


def _async_session(
    request: pytest.FixtureRequest,
    async_dbsession_factory: AsyncDbSessionFactory,
    dbsession_event_loop: asyncio.AbstractEventLoop,
    run: _Run,
) -> Iterator[AsyncSession]:
    """The ``async_db_session`` fixture (see ``_rolled_back_session``)."""
    _refuse_foreign_runner(request.node)
    yield from _rolled_back_session(
        async_dbsession_factory,
        dbsession_event_loop.run_until_complete,
        _hooks_of(request),
        "async_db_session",
        run.connections,
    )


_FOREIGN_RUNNERS = ("asyncio", "anyio", "trio")


def _refuse_foreign_runner(node: pytest.Item) -> None:
    """Fail early, and clearly, when another plugin would run the test on another loop."""
    for name in _FOREIGN_RUNNERS:
        if node.get_closest_marker(name) is not None:
            pytest.fail(
                f"{node.nodeid} is marked {name!r}, so another plugin would run it on its own "
                "event loop, but async_db_session's connection belongs to dbsession's loop. "
                "Remove the mark: dbsession runs async def tests that use its async fixtures "
                "itself (with pytest-asyncio, keep asyncio_mode = strict).",
                pytrace=False,
            )
