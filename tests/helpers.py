"""Helpers shared by the test modules (test modules never import from each other).

Fixtures shared by several modules live in conftest.py; the functions, constants and
models they and the tests use live here.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from sqlalchemy import (
    JSON,
    Column,
    Date,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from dbsession import NAMING_CONVENTION, DbSessionFactory, RetryPolicy, Timeouts, migrations
from dbsession.example.store import MIGRATIONS as EXAMPLE_MIGRATIONS

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:
    from dbsession.asyncio import AsyncDbSessionFactory

# --- Optional extras -----------------------------------------------------------------------


def require_extra(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or skip naming the extra (with CI=true, fail instead)."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.importorskip(module, reason=f"needs pip install 'sqlalchemy-dbsession[{extra}]'")
    return importlib.import_module(module)


# --- Servers: connection ids, killing connections ------------------------------------------


def pool_checked_out(engine: Engine) -> int:
    """How many connections of ``engine``'s pool are checked out now."""
    count: int = engine.pool.checkedout()  # type: ignore[attr-defined]
    return count


def rename_first(other_connection: Engine) -> None:
    """Rename the supplier ``first`` from another session, waiting no more than 3 s for its
    row's lock (the check that no transaction of the pool still holds it)."""
    with other_connection.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET lock_timeout = '3s'"))
        else:
            conn.execute(text("SET SESSION innodb_lock_wait_timeout = 3"))
        conn.execute(text("UPDATE supplier SET name = 'renamed' WHERE name = 'first'"))


def server_pid(conn: Connection | Session) -> int:
    """The server's id for this connection: PostgreSQL backend pid or MariaDB connection id."""
    dialect = (conn.get_bind() if isinstance(conn, Session) else conn).dialect
    sql = "SELECT pg_backend_pid()" if dialect.name == "postgresql" else "SELECT CONNECTION_ID()"
    return int(conn.execute(text(sql)).scalar_one())


def kill(admin: Engine, pids: list[int]) -> None:
    """End these server sessions from another connection and wait until they are gone."""
    postgres = admin.dialect.name == "postgresql"
    with admin.connect() as conn:
        for pid in pids:
            if postgres:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            else:
                conn.execute(text(f"KILL {int(pid)}"))
    listing = (
        "SELECT pid FROM pg_stat_activity"
        if postgres
        else "SELECT ID FROM information_schema.PROCESSLIST"
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with admin.connect() as conn:
            if not set(pids) & set(conn.scalars(text(listing))):
                return
        time.sleep(0.05)
    raise AssertionError(f"server sessions {pids} still alive 10 s after being killed")


def is_killed_connection_error(error: DBAPIError) -> bool:
    """True if ``error`` says, in the server's words, that its connection was ended under
    it, and SQLAlchemy invalidated the connection (it will not go back to the pool)."""
    clues = ("terminating connection due to administrator command", "Lost connection")
    return error.connection_invalidated and any(clue in str(error) for clue in clues)


def suppliers(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(text("SELECT name FROM supplier")))


# --- Statements an engine runs -------------------------------------------------------------


def statements(engine: Engine, twin: Any = None) -> list[str]:
    """Record every statement the engine (its option views, and ``twin``: SQLite's
    read-only twin, where read-only scopes run) executes from now on."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    for target in (engine, getattr(twin, "sync_engine", twin)) if twin else (engine,):
        event.listen(target, "before_cursor_execute", record)
    return seen


# --- Retries: fast backoff, the retry log, a counter table ---------------------------------


BASE, CAP = 0.001, 0.05  # fast backoff for tests
THREE = RetryPolicy(attempts=3, base_delay=BASE, max_delay=CAP)
FIVE = RetryPolicy(attempts=5, base_delay=BASE, max_delay=CAP)


def retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]


def value(engine: Engine, row: int = 1) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT value FROM counter WHERE id = :id"), {"id": row}))


class _OnFirstRetry(logging.Handler):
    """Calls ``release()`` (ending another connection's transaction) at the first retry logged."""

    def __init__(self, release: Callable[[], object]) -> None:
        super().__init__()
        self.pending: Callable[[], object] | None = release

    def emit(self, record: logging.LogRecord) -> None:
        release = self.pending
        if "retrying in" in record.getMessage() and release is not None:
            self.pending = None
            release()


@contextmanager
def released_on_first_retry(release: Callable[[], object]) -> Iterator[None]:
    handler = _OnFirstRetry(release)
    logging.getLogger("dbsession").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("dbsession").removeHandler(handler)


# --- The ledger: accounts and transfers on a MetaData of their own (never dbsession.Base) ---


class LedgerBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Account(LedgerBase):
    __tablename__ = "rel_account"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


class Ledger(LedgerBase):
    __tablename__ = "rel_ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    transfer: Mapped[str] = mapped_column(String(40), unique=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("rel_account.id"))
    target_id: Mapped[int] = mapped_column(ForeignKey("rel_account.id"))
    amount: Mapped[int]


class Item(LedgerBase):
    __tablename__ = "rel_item"
    name: Mapped[str] = mapped_column(String(10), primary_key=True)
    number: Mapped[int]


class Injected(Exception):
    """The failure a test raises on purpose inside a scope."""


ACCOUNTS = 20
OPENING_BALANCE = 1_000
FAILURE_POINTS = ("before_flush", "after_flush", "before_commit")


def fail_before_commit(session: Session, error: BaseException) -> None:
    """Make the scope's own ``session.commit()`` raise ``error`` before it commits."""

    def raise_it(_: Session) -> None:
        raise error

    event.listen(session, "before_commit", raise_it)


def transfer(
    session: Session,
    name: str,
    source: int,
    target: int,
    amount: int,
    fail_at: str | None,
    *,
    locked: bool = True,
) -> None:
    """Move ``amount`` between two accounts with a ledger row; raise Injected at ``fail_at``.

    ``locked`` reads the accounts ``FOR UPDATE`` in id order (no deadlocks); without
    it concurrent transfers conflict, which SERIALIZABLE turns into transient errors.
    """
    first, second = sorted((source, target))
    accounts = {n: session.get_one(Account, n, with_for_update=locked) for n in (first, second)}
    accounts[source].balance -= amount
    accounts[target].balance += amount
    session.add(Ledger(transfer=name, source_id=source, target_id=target, amount=amount))
    if fail_at == "before_flush":
        raise Injected(name)
    session.flush()
    if fail_at == "after_flush":
        raise Injected(name)
    if fail_at == "before_commit":
        fail_before_commit(session, Injected(name))


def balances(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, balance FROM rel_account"))
        return {int(id_): int(balance) for id_, balance in rows}


def ledger_rows(engine: Engine) -> list[tuple[str, int, int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT transfer, source_id, target_id, amount FROM rel_ledger"))
        return [(str(t), int(s), int(d), int(a)) for t, s, d, a in rows]


def random_transfer(
    rng: random.Random, number: int, i: int, failures: tuple[str, ...] = FAILURE_POINTS
) -> tuple[str, int, int, int, str | None]:
    """The i-th transfer of worker ``number``: name, source, target, amount, and the
    point where it fails (about 10% of them, at one of ``failures``) or None."""
    source, target = rng.sample(range(ACCOUNTS), 2)
    fail_at = rng.choice(failures) if rng.random() < 0.1 else None
    return f"t{number}-{i}", source, target, rng.randint(1, 50), fail_at


def run_threads(worker: Callable[[int], None], count: int) -> None:
    """Run ``worker(0)`` .. ``worker(count - 1)`` in threads at once; wait for them all."""
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def assert_books_match(engine: Engine, committed: dict[str, tuple[int, int, int]]) -> None:
    """Exactly one ledger row per committed transfer (name -> source, target, amount), none
    for any other, and every balance is the opening balance moved by exactly those."""
    rows = ledger_rows(engine)
    assert sorted(row[0] for row in rows) == sorted(committed)  # one row each, none for failures
    assert {row[0]: row[1:] for row in rows} == committed
    expected = dict.fromkeys(range(ACCOUNTS), OPENING_BALANCE)
    for source, target, amount in committed.values():
        expected[source] -= amount
        expected[target] += amount
    assert balances(engine) == expected  # failed transfers moved no money
    assert sum(expected.values()) == ACCOUNTS * OPENING_BALANCE


# --- Async pools ---------------------------------------------------------------------------


def checked_out(factory: AsyncDbSessionFactory) -> int:
    count: int = factory.engine.pool.checkedout()  # type: ignore[attr-defined]
    return count


# --- The pytest plugin's toy app, run by pytester ------------------------------------------


TOY_APP = '''
"""A toy app: its functions commit inside dbsession's session_scope()."""

from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbsession import DbSessionFactory, session_scope


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "toy_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


def add_item(name):
    with session_scope() as session:
        session.add(Item(name=name))


def add_item_on_the_class(name):
    with session_scope() as session:
        session.add(Item(name=name))


def add_item_then_fail(name):
    with session_scope() as session:
        session.add(Item(name=name))
        session.flush()
        raise RuntimeError("payment declined")


def names():
    with session_scope() as session:
        return sorted(session.scalars(select(Item.name)))
'''


def run_inner(pytester: pytest.Pytester, url: URL, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        f"--dbsession-url={url.render_as_string(hide_password=False)}",
        "--dbsession-metadata=toyapp:Base.metadata",
        "-v",
        *args,
    )


def toy_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT COUNT(*) FROM toy_item")) or 0)


def toy_table_dropped_after(engine: Engine) -> Iterator[Engine]:
    """Yield ``engine``, then drop the toy app's table (the schema outlives the inner runs)."""
    yield engine
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS toy_item"))


# --- Docs: the fenced blocks of a Markdown page -------------------------------------------


FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(not-run|file):\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its language, code, first line number and marker."""

    language: str
    code: str
    line: int
    marker: str | None  # None (run it), "not-run" or "file"
    argument: str  # the reason, or the file's path


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown page, with the marker comment just before each."""
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = MARKER.fullmatch(before)
        found.append(
            Block(
                language=match.group(1),
                code=match.group(2),
                line=text.count("\n", 0, match.start()) + 2,
                marker=marker.group(1) if marker else None,
                argument=marker.group(2) if marker else "",
            )
        )
    return found


# --- Web apps of the integration tests ----------------------------------------------------


# app: the modules it needs, each with the extra that installs it
APPS = {
    "fastapi": {"fastapi": "fastapi"},
    "fastapi-async": {"fastapi": "fastapi", "aiosqlite": "async", "aiomysql": "async"},
    "flask": {"flask": "flask"},
}


def app_client(
    request: pytest.FixtureRequest,
    factory: DbSessionFactory,
    apps: Mapping[str, Callable[[DbSessionFactory], Iterator[T]]],
) -> Iterator[T]:
    """The client ``apps[request.param](factory)`` yields, once the app's extras are there."""
    name: str = request.param
    for module, extra in APPS[name].items():
        require_extra(module, extra)
    yield from apps[name](factory)


# --- Migrations of the example ------------------------------------------------------------


#: The example's own revisions (shipped in the package): the template's alembic.ini has an
#: empty first revision, these create the example tables.
INI = EXAMPLE_MIGRATIONS
TABLES = {"customer", "supplier", "orders"}


def tables(url: URL) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def upgrade_at_once(url: URL, cwd: Path, count: int = 4) -> None:
    """Run ``dbsession upgrade`` in ``count`` processes at once: all succeed, one migrates."""
    shown = url.render_as_string(hide_password=False)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dbsession", "--url", shown, "--migrations", str(INI)]
            + ["upgrade"],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * count, outputs
    assert sum("Running upgrade" in out for out in outputs) == 1, outputs


def migrate_to_base(url: URL) -> None:
    """Downgrade the database to base and drop Alembic's version table."""
    migrations.downgrade("base", url=url, migrations=INI)
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


# --- Bounded waits -----------------------------------------------------------------------


BOUND = 40.0  # seconds: every wait below must end well before this
QUICK = Timeouts(connect=2, read=2, ping=1)


def within(bound: float, call: Callable[[], T]) -> T:
    """``call()`` in a thread; fail if it has not returned (or raised) after ``bound`` s."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as error:
            outcome.append((False, error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound)
    assert outcome, f"still waiting after {bound} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


# --- Bulk insert: tables with awkward values ---------------------------------------------


metadata = MetaData()


def item_table(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(200), nullable=False),
        Column("note", Text),
        Column("day", Date),
        Column("amount", Numeric(12, 2)),
        Column("doc", JSON),
        Column("blob", LargeBinary),
        Column("label", String(20), default="plain"),
    )


ITEM = item_table("bulk_item")
REFERENCE = item_table("bulk_item_reference")

AWKWARD = [
    *("tab\there", "new\nline", "back\\slash \\N", "crlf\r\n"),
    *("ünïcødé ✓ 漢字", "", "'quote\""),
]


def awkward_rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"{AWKWARD[i % len(AWKWARD)]} {i}",
            "note": None if i % 3 == 0 else AWKWARD[(i + 1) % len(AWKWARD)],
            "day": None if i % 5 == 0 else datetime.date(2024, 1, 1) + datetime.timedelta(days=i),
            "amount": None if i % 7 == 0 else Decimal(f"{i}.{i % 100:02d}"),
            "doc": None if i % 4 == 0 else {"i": i, "text": AWKWARD[i % len(AWKWARD)], "l": [1]},
            "blob": None if i % 6 == 0 else bytes([i % 256, 0, 9, 10, 92, 255]),
        }
        for i in range(count)
    ]


def stored(engine: Engine, table: Table) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row)[1:] for row in conn.execute(select(table).order_by(table.c.id))]


# --- observability.configure() at random moments ---------------------------------------------


class Planned(Exception):
    """Raised inside a scope on purpose: the scope must roll back."""


def observability_configurations() -> list[Callable[[], None]]:
    """Every kind of observability configuration, OpenTelemetry spans and metrics included."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from dbsession import observability

    def otel(slow: float | None, stats: bool) -> Callable[[], None]:
        def apply() -> None:
            observability.configure(
                slow_scope_seconds=slow,
                stats=stats,
                opentelemetry=True,
                tracer_provider=TracerProvider(),
                meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
            )

        return apply

    return [
        otel(None, False),
        lambda: observability.configure(),
        lambda: observability.configure(slow_scope_seconds=None, stats=False),
        lambda: observability.configure(slow_scope_seconds=0.0001),
        lambda: observability.configure(slow_scope_seconds=None, stats=True),
        otel(0.0001, True),
    ]


def reconfigure_until(stop: threading.Event, seed: int) -> None:
    """Switch between the configurations at random moments until ``stop`` is set."""
    chooser = random.Random(seed)
    options = observability_configurations()
    while not stop.is_set():
        chooser.choice(options)()
        time.sleep(chooser.uniform(0, 0.003))


@contextmanager
def reconfiguring(seed: int) -> Iterator[None]:
    """Run the block while another thread reconfigures observability at random moments;
    the default configuration (statistics off) is restored afterwards."""
    from dbsession import observability

    stop = threading.Event()
    thread = threading.Thread(target=reconfigure_until, args=(stop, seed))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        observability.configure(stats=False)
        observability.reset_stats()
