"""Alembic driven from Python: upgrade, current, head, the at-head check and the migration lock.

The URL reaches Alembic as an object in ``Config.attributes``, never as text in
``alembic.ini`` (so a password with ``%``, ``@``, ``:`` or ``/`` works and is never
printed). The same resolution applies everywhere: ``url=`` here or ``-x url=...``
on the alembic command line, else ``DATABASE_URL``, else the embedded SQLite file.

Where the migrations are: the ``migrations`` argument (a folder, or an ``.ini``
file), else ``DBSESSION_MIGRATIONS``, else ``./alembic.ini``, else ``./migrations``.
Which metadata autogenerate compares with: the ``metadata`` argument, else
``DBSESSION_METADATA``, else ``dbsession_metadata`` in ``alembic.ini``; an import
path such as ``myapp.models:Base.metadata``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from logging.config import fileConfig
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import MetaData, event, select, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from ._classify import backend_of, error_code
from ._concurrently import commit_point as _commit_point
from ._config import first_line, make_settings, mask_url, resolve_url, scrub, sync_twin
from ._engine import make_engine
from ._errors import (
    ConfigurationError,
    MigrationError,
    MigrationLockTimeoutError,
    MigrationsNotFoundError,
    SchemaNotAtHeadError,
    UnknownRevisionError,
)
from ._lockwait import Blocker as Blocker
from ._lockwait import LockSafeRunner
from ._lockwait import LockWait as LockWait
from ._lockwait import lock_wait_of as lock_wait_of
from ._migration_check import Finding as Finding
from ._migration_check import check as check_revisions
from ._migration_rules import MY, PG
from ._rehearse import Recorder
from ._rehearse import RehearsedStatement as RehearsedStatement

MIGRATIONS_ENV = "DBSESSION_MIGRATIONS"
METADATA_ENV = "DBSESSION_METADATA"
METADATA_OPTION = "dbsession_metadata"
#: Set in Config.attributes when dbsession built the Config: env.py leaves logging alone.
MANAGED_ATTRIBUTE = "dbsession_managed"
_URL_ATTRIBUTE = "dbsession_url"
_METADATA_ATTRIBUTE = "dbsession_metadata"
_LOCK_WAIT_ATTRIBUTE = "dbsession_lock_wait"
_REHEARSAL_ATTRIBUTE = "dbsession_rehearsal"
_LOCK_NAME = "dbsession_migrations"
_PG_LOCK_KEY = 0x64627365  # "dbse"
_LOCK_TIMEOUT_SECONDS = 600.0
_LOCK_TIMEOUT_ENV = "DBSESSION_MIGRATION_LOCK_TIMEOUT"

Migrations = str | os.PathLike[str] | None
logger: logging.Logger = logging.getLogger("dbsession")


def make_config(
    migrations: Migrations = None,
    *,
    url: str | URL | None = None,
    metadata: str | None = None,
) -> Config:
    """Build the Alembic Config for a migrations folder or ``.ini`` file (see module docs).

    A ``url`` given is resolved now: an empty one raises InvalidURLError (it never
    falls back to ``DATABASE_URL``). Raises MigrationsNotFoundError when there is
    nothing to run, MigrationError when the ``.ini`` file cannot be read.
    """
    resolved = None if url is None else _resolve(url)
    location = _find_migrations(migrations)
    if location.suffix == ".ini":
        config = Config(str(location))
        try:
            config.get_main_option("script_location")
        except Exception as error:  # configparser's errors: a '%' in the path, bad syntax
            raise MigrationError(
                f"Cannot read {location}: {type(error).__name__}: "
                f"{str(error).splitlines()[0]}. Rename the folder or file (configparser "
                "reads '%' as interpolation) or fix its syntax."
            ) from None
    else:
        config = Config()
        config.set_main_option("script_location", str(location).replace("%", "%%"))
    config.attributes[MANAGED_ATTRIBUTE] = True
    if resolved is not None:
        config.attributes[_URL_ATTRIBUTE] = resolved
    if metadata is not None:
        config.attributes[_METADATA_ATTRIBUTE] = metadata
    return config


def upgrade(
    revision: str = "head",
    *,
    url: str | URL | None = None,
    migrations: Migrations = None,
    sql: bool = False,
    lock_wait: float | LockWait | None = None,
) -> None:
    """Upgrade the database to ``revision``, holding the migration lock while it runs.

    With several workers starting at once, one migrates and the others wait, then
    find the database at head. ``sql=True`` prints the SQL instead (offline mode).
    Each statement waits at most ``lock_wait`` seconds for its lock (a LockWait says how
    often to try again; default DBSESSION_MIGRATION_LOCK_WAIT, else 3 s and 5 tries; 0:
    no limit). Raises MigrationBlockedError when a statement never got its lock,
    UnknownRevisionError, MigrationError, MigrationsNotFoundError or
    DatabaseUnreachableError.
    """
    policy = lock_wait_of(lock_wait)
    config = make_config(migrations, url=url)
    config.attributes[_LOCK_WAIT_ATTRIBUTE] = policy
    run_command(command.upgrade, config, revision, sql=sql)


def downgrade(
    revision: str,
    *,
    url: str | URL | None = None,
    migrations: Migrations = None,
    sql: bool = False,
    lock_wait: float | LockWait | None = None,
) -> None:
    """Downgrade the database to ``revision`` (``"base"`` undoes every migration).

    The database is logged (masked, at WARNING) before anything is undone. ``lock_wait``
    and the errors raised are those of ``upgrade``.
    """
    policy = lock_wait_of(lock_wait)
    config = make_config(migrations, url=url)
    config.attributes[_LOCK_WAIT_ATTRIBUTE] = policy
    logger.warning("dbsession: downgrading %s to %s", describe_target(url), revision)
    run_command(command.downgrade, config, revision, sql=sql)


def describe_target(url: str | URL | None) -> str:
    """The masked URL the migration commands would act on, and where it came from."""
    resolved, source = resolve_url(url)
    return f"{mask_url(sync_twin(resolved))} (from {source})"


def current(*, url: str | URL | None = None) -> str | None:
    """Return the database's current revision, or None for an unmigrated database.

    Reads only: a SQLite file that does not exist is not created (None: no revision).
    """
    resolved = _resolve(url)
    if missing_sqlite_file(resolved):
        return None
    with _connect(resolved) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def missing_sqlite_file(url: str | URL | None) -> str | None:
    """The path of the SQLite file ``url`` names if it does not exist yet, else None."""
    resolved = _resolve(url)
    database = resolved.database or ""
    is_file = database not in ("", ":memory:") and not database.startswith("file:")
    if resolved.get_backend_name() == "sqlite" and is_file and not Path(database).exists():
        return database
    return None


def head(*, migrations: Migrations = None) -> str:
    """Return the newest revision of the migrations folder.

    Raises MigrationError when the folder has no revision or more than one head.
    """
    script = ScriptDirectory.from_config(make_config(migrations))
    heads = script.get_heads()
    if not heads:
        raise MigrationError(
            f"The migrations folder {script.dir} has no revision yet: create the first "
            "with 'dbsession revision --autogenerate -m first'."
        )
    if len(heads) > 1:
        raise MigrationError(
            f"The migrations folder {script.dir} has {len(heads)} heads {sorted(heads)}; "
            "expected exactly one. Merge them with 'dbsession merge -m merge' (then "
            "'dbsession upgrade')."
        )
    return heads[0]


def rehearse(
    *, url: str | URL | None = None, migrations: Migrations = None, sample: int = 1000
) -> list[RehearsedStatement]:
    """Run the pending revisions on a scratch copy of the database and return, per
    statement, how long it ran, the table locks it took and the tables it rewrote.

    PostgreSQL only. The copy is a new database on the same server (the role needs
    CREATEDB): the revisions up to the database's current one, then up to ``sample`` rows
    of each table (when the role may skip foreign-key checks, else none); it is dropped
    after. The database itself is only read. Raises ConfigurationError for another backend.
    """
    target = _resolve(url)
    if target.get_backend_name() != "postgresql":
        raise ConfigurationError(
            "Rehearsing needs PostgreSQL (it reads pg_locks and each table's relfilenode); "
            f"the database is {target.get_backend_name()}."
        )
    at = current(url=target)
    scratch = target.set(database=f"dbsession_rehearsal_{uuid.uuid4().hex[:10]}")
    with _connect(target) as admin:
        admin.execution_options(isolation_level="AUTOCOMMIT")
        admin.execute(text(f'CREATE DATABASE "{scratch.database}"'))
    try:
        if at is not None:
            upgrade(at, url=scratch, migrations=migrations, lock_wait=0)
        _copy_sample(target, scratch, sample)
        recorder = Recorder()
        config = make_config(migrations, url=scratch)
        config.attributes[_LOCK_WAIT_ATTRIBUTE] = LockWait(seconds=0)
        config.attributes[_REHEARSAL_ATTRIBUTE] = recorder
        run_command(command.upgrade, config, "head")
        return recorder.statements
    finally:
        with _connect(target) as admin:
            admin.execution_options(isolation_level="AUTOCOMMIT")
            admin.execute(text(f'DROP DATABASE IF EXISTS "{scratch.database}" WITH (FORCE)'))


def _copy_sample(source: URL, scratch: URL, rows: int) -> None:
    """Up to ``rows`` rows of each table, foreign keys unchecked (a sample has orphans)."""
    if rows <= 0:
        return
    metadata = MetaData()
    with _connect(scratch) as connection:
        metadata.reflect(connection)
    try:
        with _connect(source) as reader, _connect(scratch) as writer:
            writer.execute(text("SET session_replication_role = replica"))
            tables = [t for t in metadata.sorted_tables if t.name != "alembic_version"]
            if tables:  # rows the revisions inserted make way for the sample
                names = ", ".join(
                    writer.dialect.identifier_preparer.format_table(t) for t in tables
                )
                writer.execute(text(f"TRUNCATE {names}"))
            for table in metadata.sorted_tables:
                if table.name != "alembic_version":
                    found = [dict(r._mapping) for r in reader.execute(select(table).limit(rows))]
                    if found:
                        writer.execute(table.insert(), found)
            writer.commit()
    except DBAPIError as error:
        logger.warning(
            "dbsession: rehearsing without a sample of rows (%s)", first_line(error, source)
        )


def commit_point(connection: Connection | None = None) -> None:
    """In a revision's ``upgrade()``: commit what it did so far, keeping the migration lock
    and the lock wait; for a backfill in batches, so that no batch holds its rows' locks
    until the whole migration ends. ``connection``: default ``op.get_bind()``.

    A revision that fails after a commit point runs again from its start on the next
    upgrade: make the statements before it safe to repeat (``WHERE new IS NULL``).
    """
    if connection is None:
        from alembic import op

        if op.get_context().as_sql:  # offline (--sql, dbsession lint): nothing to commit
            return
        connection = op.get_bind()
    _commit_point(connection, lock_key=_PG_LOCK_KEY)


def lint(
    *,
    migrations: Migrations = None,
    metadata: str | None = None,
    backends: Sequence[str] | None = None,
    since: str | None = None,
    pending: bool = False,
    url: str | URL | None = None,
) -> list[Finding]:
    """Check revisions for operations that block traffic or rewrite a table on a live
    database (the rules: docs/migrations.md); return what they find, oldest first.

    Checked: every revision, or those after ``since``, or with ``pending=True`` those the
    database at ``url`` has not run yet. ``backends``: ``postgresql`` and/or ``mysql``
    (default: both; with ``pending``, the database's). ``metadata`` (else the usual
    setting) tells which columns the code still maps. Raises UnknownRevisionError,
    MigrationError, MigrationsNotFoundError, ConfigurationError.
    """
    config = make_config(migrations, metadata=metadata)
    script = ScriptDirectory.from_config(config)
    if pending:
        since = current(url=url)
        backends = backends or [backend_of(_resolve(url).get_backend_name())]
    chosen = list(backends or (PG, MY))
    unknown = sorted(set(chosen) - {PG, MY})
    if unknown:
        raise ConfigurationError(
            f"Unknown backend(s) {unknown} for lint: choose among {PG!r} and {MY!r}."
        )
    revisions = run_command(
        lambda _: list(script.iterate_revisions("heads", since or "base")), config
    )
    ordered = [r for r in reversed(revisions) if r.revision != since]
    return check_revisions(ordered, chosen, _load_metadata(config))


def is_at_head(*, url: str | URL | None = None, migrations: Migrations = None) -> bool:
    """True when the database's revision is the newest revision of the migrations folder."""
    return current(url=url) == head(migrations=migrations)


def require_head(*, url: str | URL | None = None, migrations: Migrations = None) -> None:
    """Raise SchemaNotAtHeadError, naming both revisions, unless the database is at head.

    ``migrations`` is the folder or ``.ini`` file (see module docs): pass it when the
    process does not start in the project folder (systemd, ``gunicorn --chdir``).
    """
    newest = head(migrations=migrations)
    at = current(url=url)
    if at != newest:
        raise SchemaNotAtHeadError(at, newest)


#: The whole of a dbsession ``migrations/env.py``.
ENV_PY = '''"""Alembic environment: dbsession supplies the URL, metadata and migration lock."""

from dbsession.migrations import run_env

run_env()
'''


def run_env() -> None:
    """The body of ``migrations/env.py``: run Alembic with dbsession's URL, metadata and lock.

    Sets up logging from ``alembic.ini`` when run by the ``alembic`` command itself.
    """
    from alembic import context

    config = context.config
    if config.config_file_name is not None and MANAGED_ATTRIBUTE not in config.attributes:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    metadata = _load_metadata(config)
    given = config.attributes.get(_URL_ATTRIBUTE)
    url = _resolve(given if given is not None else _x_argument(context))
    is_sqlite = url.get_backend_name() == "sqlite"
    options: dict[str, Any] = {
        "target_metadata": metadata,
        "compare_type": True,
        "render_as_batch": is_sqlite,
        "transaction_per_migration": True,
    }
    if is_sqlite:  # dbsession's engine emits BEGIN itself, so SQLite DDL is transactional
        options["transactional_ddl"] = True
    if context.is_offline_mode():
        context.configure(
            dialect_name=url.get_dialect().name,
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
            **options,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    shared: Connection | None = config.attributes.get("connection")
    if shared is not None:
        context.configure(connection=shared, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    with _engine(url) as engine:
        recorder = config.attributes.get(_REHEARSAL_ATTRIBUTE)
        if recorder is not None:  # rehearse(): before the runner's hook, so it runs first
            event.listen(engine, "do_execute", recorder)
        runner = LockSafeRunner(engine, _lock_wait(config, context), lock_key=_PG_LOCK_KEY)

        def migrate(connection: Connection) -> None:
            with migration_lock(connection):
                # On PostgreSQL the lock's transaction is open: Alembic runs every migration
                # in it (transactional DDL), and its commit releases the lock.
                runner.arm(connection)
                context.configure(connection=connection, **options)
                with context.begin_transaction():
                    context.run_migrations()
                connection.commit()

        runner.run(migrate)


def _lock_wait(config: Config, context: Any) -> LockWait:
    """upgrade(lock_wait=...), else ``-x lock_wait=SECONDS``, else the environment."""
    given: LockWait | None = config.attributes.get(_LOCK_WAIT_ATTRIBUTE)
    if given is not None:
        return given
    raw = context.get_x_argument(as_dictionary=True).get("lock_wait")
    if raw is None:
        return lock_wait_of(None)
    try:
        return lock_wait_of(float(raw), source="-x lock_wait")
    except ValueError:
        raise ConfigurationError(
            f"-x lock_wait={raw!r} is not a number of seconds (0 turns the lock wait off)."
        ) from None


@contextmanager
def _engine(url: str | URL) -> Iterator[Engine]:
    """An engine with dbsession's opinions and no pool, disposed after."""
    engine = make_engine(make_settings(url, engine_options={"poolclass": NullPool}))
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _connect(url: str | URL) -> Iterator[Connection]:
    """A connection of an engine with dbsession's opinions and no pool, disposed after."""
    with _engine(url) as engine, engine.connect() as connection:
        yield connection


@contextmanager
def migration_lock(connection: Connection, timeout: float | None = None) -> Iterator[None]:
    """Hold the process-crossing migration lock for this database while the block runs.

    PostgreSQL: ``pg_advisory_xact_lock``, taken in the transaction the block runs in and
    released by its commit or rollback, so it holds through any pooler (a session lock
    taken in one transaction and released in another may meet two server sessions
    behind PgBouncer in transaction mode); the block must run in that one transaction.
    MySQL/MariaDB: ``GET_LOCK`` on a name scoped to the database, whose release is checked.
    SQLite: an exclusive ``flock`` on ``<database file>.migrations.lock`` (URI-form URLs
    too). In-memory SQLite needs none. Waits at most ``timeout`` seconds (default
    DBSESSION_MIGRATION_LOCK_TIMEOUT, else 600), then raises MigrationLockTimeoutError
    naming what holds the lock.
    """
    limit = _lock_timeout(timeout)
    backend = connection.dialect.name
    if backend == "postgresql":
        _pg_lock(connection, limit)
        yield
    elif backend in ("mysql", "mariadb"):
        name = _mysql_lock_name(connection)
        got = connection.execute(
            text("SELECT GET_LOCK(:name, :timeout)"), {"name": name, "timeout": limit}
        ).scalar()
        connection.commit()
        if got != 1:
            raise MigrationLockTimeoutError(
                f"Waited {limit:g} s for the migration lock {name!r}, held by "
                f"{_mysql_holder(connection, name)}; retry when that migration is done, or "
                f"raise {_LOCK_TIMEOUT_ENV}."
            )
        try:
            yield
        finally:
            connection.rollback()
            released = connection.execute(
                text("SELECT RELEASE_LOCK(:name)"), {"name": name}
            ).scalar()
            connection.commit()
            if released != 1:
                raise MigrationError(
                    f"The migration lock {name!r} was no longer held at the end "
                    f"(RELEASE_LOCK returned {released!r}): the connection was lost or reset "
                    "during the migration, so another process may have migrated at the same "
                    "time. Check the schema with 'dbsession current' before going on."
                )
    else:
        with _file_lock(connection.engine.url.database, limit):
            yield


def _lock_timeout(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    raw = os.environ.get(_LOCK_TIMEOUT_ENV)
    try:
        return float(raw) if raw else _LOCK_TIMEOUT_SECONDS
    except ValueError:
        raise ConfigurationError(
            f"{_LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds."
        ) from None


def _pg_lock(connection: Connection, limit: float) -> None:
    """Take the transaction-level advisory lock in the connection's (new) transaction."""
    connection.execute(text(f"SET LOCAL lock_timeout = {max(1, int(limit * 1000))}"))
    try:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    except DBAPIError as error:
        if error_code(error, "postgresql") != "55P03":
            raise
        connection.rollback()
        holder = connection.execute(_PG_HOLDER, {"key": _PG_LOCK_KEY}).first()
        connection.rollback()
        who = (
            f"server process {holder.pid} ({holder.who}, {holder.state}, since {holder.since})"
            if holder is not None
            else "another session (gone now)"
        )
        raise MigrationLockTimeoutError(
            f"Waited {limit:g} s for the migration lock (PostgreSQL advisory lock "
            f"{_PG_LOCK_KEY}), held by {who}; retry when that migration is done, or raise "
            f"{_LOCK_TIMEOUT_ENV}."
        ) from None
    connection.execute(text("SET LOCAL lock_timeout TO DEFAULT"))


_PG_HOLDER = text(
    "SELECT a.pid, coalesce(nullif(a.application_name, ''), a.usename) || '@' || "
    "coalesce(host(a.client_addr), 'local') AS who, a.state, "
    "date_trunc('second', a.xact_start) AS since "
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objid = :key LIMIT 1"
)


def _mysql_lock_name(connection: Connection) -> str:
    """``dbsession_migrations:<database>``; GET_LOCK names are server-wide, at most 64 chars."""
    database = str(connection.execute(text("SELECT DATABASE()")).scalar() or "")
    name = f"{_LOCK_NAME}:{database}"
    if len(name) > 64:
        name = f"{_LOCK_NAME}:{hashlib.sha1(database.encode()).hexdigest()}"
    return name


def _mysql_holder(connection: Connection, name: str) -> str:
    row = connection.execute(
        text(
            "SELECT p.ID, p.USER, p.HOST, p.TIME FROM information_schema.PROCESSLIST p "
            "WHERE p.ID = IS_USED_LOCK(:name)"
        ),
        {"name": name},
    ).first()
    connection.commit()
    if row is None:
        return "another session (gone now)"
    return f"connection {row[0]} ({row[1]}@{row[2]}, for {row[3]} s)"


@contextmanager
def _file_lock(database: str | None, limit: float) -> Iterator[None]:
    path = _sqlite_file(database)
    if path is None:
        yield
        return
    import fcntl

    deadline = time.monotonic() + limit
    with open(f"{path}.migrations.lock", "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MigrationLockTimeoutError(
                        f"Waited {limit:g} s for the migration lock {path}.migrations.lock, "
                        "held by another process migrating this SQLite file; retry when it "
                        f"is done, or raise {_LOCK_TIMEOUT_ENV}."
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_file(database: str | None) -> str | None:
    """The file a SQLite database lives in (plain path or ``file:`` URI); None in memory."""
    if not database or database == ":memory:":
        return None
    if not database.startswith("file:"):
        return database
    path, _, query = database[len("file:") :].partition("?")
    options = dict(part.partition("=")[::2] for part in query.split("&") if part)
    if options.get("mode") == "memory" or options.get("vfs") == "memdb" or not path:
        return None
    if path.startswith("//"):  # file://host/path: only an empty or localhost host is allowed
        path = "/" + path[2:].partition("/")[2]
    return unquote(path)


def metadata_configured(config: Config) -> bool:
    """True when autogenerate has metadata to compare with (argument, environment or ini)."""
    return _load_metadata(config) is not None


def run_command(fn: Any, config: Config, *args: Any, **kwargs: Any) -> Any:
    """Run an ``alembic.command`` function, turning its errors into dbsession's."""
    url = config.attributes.get(_URL_ATTRIBUTE)
    try:
        return fn(config, *args, **kwargs)
    except CommandError as error:
        message = str(error)
        if url is not None:
            message = scrub(message, _resolve(url))
        if "Can't locate revision" in message or "No such revision" in message:
            raise UnknownRevisionError(
                f"{message}. 'dbsession history' lists the revisions of the migrations folder."
            ) from None
        raise MigrationError(f"Alembic: {message}") from None


def _resolve(url: str | URL | None) -> URL:
    """The URL to migrate: migrations run outside any event loop, so an async driver's URL
    (``sqlite+aiosqlite``, ``mysql+aiomysql``) becomes its sync twin."""
    return sync_twin(resolve_url(url)[0])


def _x_argument(context: Any) -> str | None:
    value: str | None = context.get_x_argument(as_dictionary=True).get("url")
    return value


def _find_migrations(migrations: Migrations) -> Path:
    candidates: list[Path]
    if migrations is not None:
        candidates = [Path(migrations)]
    elif os.environ.get(MIGRATIONS_ENV):
        candidates = [Path(os.environ[MIGRATIONS_ENV])]
    else:
        candidates = [Path("alembic.ini"), Path("migrations")]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".ini":
            return candidate.absolute()
        if (candidate / "env.py").is_file():
            return candidate.absolute()
    looked = ", ".join(str(c.absolute()) for c in candidates)
    raise MigrationsNotFoundError(
        f"No migrations found (looked for {looked}). Name the folder or .ini file: "
        f"migrations= in Python, --migrations DIR on the command line, or {MIGRATIONS_ENV}; "
        "or create a migrations folder with 'dbsession init'."
    )


def _load_metadata(config: Config) -> MetaData | None:
    in_ini = f"{METADATA_OPTION} in {config.config_file_name}"
    for source, path in (
        ("--metadata", config.attributes.get(_METADATA_ATTRIBUTE)),
        (METADATA_ENV, os.environ.get(METADATA_ENV)),
        (in_ini, config.get_main_option(METADATA_OPTION)),
    ):
        if path:
            return load_metadata(path, source=source)
    return None


def load_metadata(path: str, *, source: str = "the metadata setting") -> MetaData:
    """Import ``package.module:attribute.path`` and return the MetaData it names.

    ``source`` names the setting the path came from, for the message. Raises
    ConfigurationError when the path is malformed, the module cannot be imported (or
    raises on import), or the attribute does not exist or is not a MetaData.
    """
    module_name, _, attribute = path.partition(":")
    fix = f"Fix {source}: an absolute import path such as 'myapp.models:Base.metadata'"
    if not module_name or module_name.startswith("."):
        raise ConfigurationError(f"{source} is {path!r}, which names no module. {fix}.")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(
            f"Cannot import {module_name!r} for the metadata {path!r} from {source} "
            f"({error}); the current folder {os.getcwd()!r} and sys.path are searched: "
            f"run from the folder that holds the package, or set PYTHONPATH. {fix}."
        ) from None
    except Exception as error:
        raise ConfigurationError(
            f"Importing {module_name!r} for the metadata {path!r} from {source} raised "
            f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}. Fix that module "
            "(run with --traceback to see where)."
        ) from error
    try:
        for part in filter(None, attribute.split(".")):
            target = getattr(target, part)
    except AttributeError as error:
        raise ConfigurationError(f"Cannot load the metadata {path!r} ({error}). {fix}.") from None
    if not isinstance(target, MetaData):
        raise ConfigurationError(
            f"{path!r} is a {type(target).__name__}, not a MetaData: point {source} at "
            "'package.module:Base.metadata'."
        )
    return target
