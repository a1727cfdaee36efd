"""Load for the lock-safe migration test and benchmark (benchmarks/migration_stall.py).

A migrations folder whose first revision creates ``lockwait_orders`` (1,000 rows) and whose
second adds a nullable column to it; ``env.py`` is dbsession's, or for comparison Alembic's
own generic one (``bare=True``: no lock wait, no migration lock). :func:`stall` runs the
scenario of issue 26: threads read rows by primary key every few milliseconds; a long
transaction reads one row and stays open (an idle-in-transaction worker, a report); the
upgrade runs. It returns the longest time any single read took (the stall the traffic
saw), how long the upgrade took, and how it ended.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from dbsession import migrations
from dbsession.migrations import LockWait

TABLE = "lockwait_orders"
ROWS = 1000

_BARE_ENV = '''"""Alembic's generic env.py, online part: what a project without dbsession runs."""
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

connectable = create_engine(context.config.attributes["url"], poolclass=NullPool)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
'''

_FIRST = f'''"""create {TABLE}"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    table = op.create_table(
        "{TABLE}",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("amount", sa.Integer, nullable=False),
    )
    op.bulk_insert(table, [{{"id": n, "amount": n}} for n in range({ROWS})])


def downgrade() -> None:
    op.drop_table("{TABLE}")
'''

_SECOND = f'''"""add a nullable column to {TABLE}"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column("{TABLE}", sa.Column("note", sa.String(40), nullable=True))


def downgrade() -> None:
    op.drop_column("{TABLE}", "note")
'''


def make_migrations(folder: Path, *, bare: bool = False) -> Path:
    """Write the two-revision migrations folder; return it."""
    (folder / "versions").mkdir(parents=True)
    (folder / "env.py").write_text(_BARE_ENV if bare else migrations.ENV_PY)
    (folder / "versions" / "0001_create.py").write_text(_FIRST)
    (folder / "versions" / "0002_add_column.py").write_text(_SECOND)
    return folder


def upgrade_bare(url: URL, folder: Path, revision: str) -> None:
    """Alembic's own ``upgrade`` on a ``bare=True`` folder."""
    config = Config()
    config.set_main_option("script_location", str(folder))
    config.attributes["url"] = url
    command.upgrade(config, revision)


def has_note_column(url: URL) -> bool:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return "note" in {c["name"] for c in inspect(engine).get_columns(TABLE)}
    finally:
        engine.dispose()


def drop_all(url: URL) -> None:
    """Drop the table and Alembic's version table."""
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


@dataclass
class Traffic:
    """``threads`` threads reading one row by primary key, then sleeping ``pause`` s."""

    engine: Engine
    threads: int = 4
    pause: float = 0.005
    longest: float = 0.0
    reads: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self) -> None:
        query = text(f"SELECT amount FROM {TABLE} WHERE id = :id")
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with self.engine.connect() as conn:
                    conn.execute(query, {"id": random.randrange(ROWS)}).scalar_one()
            except Exception as error:
                with self._lock:
                    self.errors.append(error)
            took = time.perf_counter() - started
            with self._lock:
                self.reads += 1
                self.longest = max(self.longest, took)
            time.sleep(self.pause)

    @contextmanager
    def running(self) -> Iterator[Traffic]:
        workers = [threading.Thread(target=self._read, daemon=True) for _ in range(self.threads)]
        for worker in workers:
            worker.start()
        try:
            yield self
        finally:
            self._stop.set()
            for worker in workers:
                worker.join(timeout=60)


@contextmanager
def long_transaction(url: URL, seconds: float | None) -> Iterator[int]:
    """A transaction that read a row of the table and stays open ``seconds`` (None: until
    the block ends); yields its server process id."""
    engine = create_engine(url, poolclass=NullPool)
    release = threading.Event()
    ready = threading.Event()
    pid: list[int] = []

    def hold() -> None:
        with engine.connect() as conn:
            is_pg = conn.dialect.name == "postgresql"
            pid.append(
                conn.scalar(text("SELECT pg_backend_pid()" if is_pg else "SELECT CONNECTION_ID()"))
            )
            conn.commit()
            conn.execute(text(f"SELECT amount FROM {TABLE} WHERE id = 1")).scalar_one()
            ready.set()
            release.wait(seconds)
            conn.commit()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    ready.wait(30)
    try:
        yield pid[0]
    finally:
        release.set()
        holder.join(timeout=60)
        engine.dispose()


@dataclass
class Outcome:
    """What the traffic saw while the upgrade ran."""

    longest_read: float
    reads: int
    read_errors: int
    upgrade_seconds: float
    error: BaseException | None
    holder: int


def stall(
    url: URL,
    folder: Path,
    *,
    lock_wait: LockWait | None,
    hold: float | None,
    bare: bool = False,
    settle: float = 0.5,
) -> Outcome:
    """Upgrade ``folder`` (at revision 0001) to head while traffic reads and a transaction
    that read the table stays open ``hold`` seconds (None: until the upgrade ends)."""
    traffic_engine = create_engine(url, pool_size=8, isolation_level="AUTOCOMMIT")
    error: BaseException | None = None
    try:
        with Traffic(traffic_engine).running() as traffic:
            time.sleep(settle)
            with long_transaction(url, hold) as holder:
                started = time.perf_counter()
                try:
                    if bare:
                        upgrade_bare(url, folder, "head")
                    else:
                        migrations.upgrade(url=url, migrations=folder, lock_wait=lock_wait)
                except Exception as caught:
                    error = caught
                took = time.perf_counter() - started
            time.sleep(settle)
    finally:
        traffic_engine.dispose()
    return Outcome(traffic.longest, traffic.reads, len(traffic.errors), took, error, holder)
