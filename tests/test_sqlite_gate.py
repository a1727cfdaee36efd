"""The SQLite write gate: first come first served, shared by the engines of one file,
never leaked, and its timeout an OperationalError that run_in_transaction retries."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlite_load import run_threads

from dbsession import DbSessionFactory, RetryPolicy
from dbsession._classify import transient_reason
from dbsession._sqlite_gate import WriteGate, gate_for, gate_key
from dbsession.errors import RetryExhaustedError, SQLiteWriteLockTimeoutError


def test_waiters_get_the_gate_in_the_order_they_came() -> None:
    gate = WriteGate("order")
    gate.acquire(5)
    order: list[int] = []
    queued = threading.Semaphore(0)

    def writer(number: int) -> None:
        time.sleep(0.05 * number)  # arrive in number order
        queued.release()
        gate.acquire(30)
        order.append(number)
        gate.release()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for _ in threads:
        queued.acquire()
    while len(gate._waiters) < len(threads):  # every one is queued
        time.sleep(0.01)
    gate.release()
    for thread in threads:
        thread.join()
    assert order == list(range(6))


def test_a_waiter_fails_only_when_the_gate_does_not_move() -> None:
    gate = WriteGate("stall")
    gate.acquire(1)
    with pytest.raises(SQLiteWriteLockTimeoutError) as raised:
        gate.acquire(0.05)
    error = raised.value
    assert isinstance(error, OperationalError)  # `except OperationalError` still catches it
    assert str(error).startswith("database is locked")
    assert transient_reason(error, "sqlite") == "SQLITE_BUSY database is locked"
    assert gate._waiters == type(gate._waiters)()  # it left the queue
    gate.release()
    gate.acquire(0.05)  # free again
    gate.release()


def test_async_waiters_do_not_block_the_event_loop_and_share_the_queue() -> None:
    gate = WriteGate("async")
    gate.acquire(5)  # held by this thread
    ticks: list[int] = []

    async def ticker() -> None:
        for n in range(5):
            ticks.append(n)
            await asyncio.sleep(0.01)

    async def body() -> None:
        waiting = asyncio.create_task(gate.acquire_async(5))
        await ticker()  # runs while the task waits for the gate
        assert not waiting.done()
        threading.Timer(0.01, gate.release).start()
        await waiting
        gate.release()

    asyncio.run(body())
    assert ticks == list(range(5))


def test_a_cancelled_async_waiter_leaves_the_queue() -> None:
    gate = WriteGate("cancel")
    gate.acquire(5)

    async def body() -> None:
        waiting = asyncio.create_task(gate.acquire_async(5))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(body())
    assert not gate._waiters
    gate.release()
    gate.acquire(0.01)  # nobody holds it
    gate.release()


def test_one_gate_per_file_whatever_the_path_spelling(tmp_path: Path) -> None:
    real = tmp_path / "one.sqlite3"
    link = tmp_path / "link.sqlite3"
    real.touch()
    os.symlink(real, link)
    os.chdir(tmp_path)
    keys = {gate_key(str(real)), gate_key(str(link)), gate_key("one.sqlite3")}
    keys.add(gate_key(f"file:{real}?mode=rwc"))
    assert keys == {os.path.realpath(real)}
    assert gate_key("file:/x?vfs=memdb") == "file:/x?vfs=memdb"
    assert gate_for(os.path.realpath(real)) is gate_for(gate_key(str(link)))


def insert(session: Session, n: int) -> None:
    session.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})


def test_a_writer_behind_a_stuck_transaction_gets_the_named_error(tmp_path: Path) -> None:
    factory = DbSessionFactory(f"sqlite:///{tmp_path}/stuck.sqlite3", sqlite_busy_timeout=0.05)
    other = DbSessionFactory(f"sqlite:///{tmp_path}/stuck.sqlite3", sqlite_busy_timeout=0.05)
    try:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
        with factory.session_scope() as holder:
            holder.execute(text("INSERT INTO t VALUES (1)"))
            with pytest.raises(RetryExhaustedError) as raised:
                other.transactional(retry=RetryPolicy(attempts=2, base_delay=0))(insert)(2)
            assert isinstance(raised.value.last_error, SQLiteWriteLockTimeoutError)
        other.run_in_transaction(insert, 3)
        with other.session_scope(readonly=True) as session:
            assert list(session.scalars(text("SELECT n FROM t ORDER BY n"))) == [1, 3]
    finally:
        factory.dispose()
        other.dispose()


@pytest.mark.parametrize("end", ["commit", "rollback", "invalidate", "close"])
def test_every_end_of_a_transaction_releases_the_gate(tmp_path: Path, end: str) -> None:
    url = f"sqlite:///{tmp_path}/ends.sqlite3"
    factory = DbSessionFactory(url, sqlite_busy_timeout=0.2)
    try:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
        gate = gate_for(gate_key(f"{tmp_path}/ends.sqlite3"))
        session = factory.create_session()
        session.execute(text("INSERT INTO t VALUES (1)"))
        assert gate._held
        if end == "commit":
            session.commit()
        elif end == "rollback":
            session.rollback()
        elif end == "invalidate":
            session.connection().invalidate()
        session.close()
        assert not gate._held
        # and SQLite's own lock is free: another connection gets it without waiting
        raw = sqlite3.connect(f"{tmp_path}/ends.sqlite3", timeout=0, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("ROLLBACK")
        raw.close()
    finally:
        factory.dispose()


def test_sync_and_async_engines_on_one_file_queue_on_one_gate(tmp_path: Path) -> None:
    pytest.importorskip("aiosqlite", reason="needs pip install 'sqlalchemy-dbsession[async]'")
    from dbsession.asyncio import AsyncDbSessionFactory

    url = f"sqlite:///{tmp_path}/shared.sqlite3"
    factory = DbSessionFactory(url, sqlite_busy_timeout=30)
    with factory.session_scope() as session:
        session.execute(text("CREATE TABLE t (n INTEGER)"))
    async_factory = AsyncDbSessionFactory(url.replace("sqlite:", "sqlite+aiosqlite:"))
    gate = gate_for(gate_key(f"{tmp_path}/shared.sqlite3"))
    order: list[str] = []

    async def async_writer() -> None:
        async with async_factory.session_scope() as session:
            await session.execute(text("INSERT INTO t VALUES (2)"))
            order.append("async")
        await async_factory.dispose()

    try:
        with factory.session_scope() as session:
            session.execute(text("INSERT INTO t VALUES (1)"))
            thread = threading.Thread(target=asyncio.run, args=(async_writer(),))
            thread.start()
            while not gate._waiters:  # the async writer queues on the same gate
                time.sleep(0.01)
            order.append("sync")
        thread.join()
        assert order == ["sync", "async"]
    finally:
        factory.dispose()


def test_threads_of_one_process_never_wait_in_sqlite(tmp_path: Path) -> None:
    # SQLite's busy timeout 0 (the gate keeps its 30 s): a writer of this process that
    # reached SQLite's busy handler would fail at once with "database is locked".
    factory = DbSessionFactory(
        f"sqlite:///{tmp_path}/t.sqlite3", sqlite_busy_timeout=30, pool_size=8
    )

    @event.listens_for(factory.engine, "connect")
    def no_busy_wait(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=0")

    errors: list[BaseException] = []
    try:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))

        def work(number: int) -> None:
            for i in range(40):
                try:
                    with factory.session_scope() as session:
                        session.execute(text("INSERT INTO t VALUES (:n)"), {"n": i})
                except BaseException as error:  # noqa: BLE001
                    errors.append(error)

        run_threads(8, work)
        assert errors == []
        with factory.session_scope(readonly=True) as session:
            assert session.scalar(text("SELECT COUNT(*) FROM t")) == 8 * 40
    finally:
        factory.dispose()


def test_in_memory_database_an_open_reader_blocks_a_writers_commit() -> None:
    # The documented difference of sqlite:// (memdb: no WAL): a reader's open read
    # transaction keeps a writer from committing, which fails after the busy timeout.
    factory = DbSessionFactory("sqlite://", sqlite_busy_timeout=0.1)
    try:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
        with factory.session_scope(readonly=True) as reader:
            assert reader.scalar(text("SELECT COUNT(*) FROM t")) == 0
            with pytest.raises(OperationalError, match="database is locked"):
                with factory.session_scope(independent=True) as writer:
                    writer.execute(text("INSERT INTO t VALUES (1)"))
        with factory.session_scope() as writer:  # with the reader gone it commits
            writer.execute(text("INSERT INTO t VALUES (2)"))
        with factory.session_scope(readonly=True) as reader:
            assert list(reader.scalars(text("SELECT n FROM t"))) == [2]
    finally:
        factory.dispose()


def test_a_relative_sqlite_url_names_one_file_whatever_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path is resolved once, as bare SQLAlchemy does: a later ``os.chdir`` cannot
    send the connections opened after it to another file."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    factory = DbSessionFactory("sqlite:///relative.sqlite3")
    try:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
            session.execute(text("INSERT INTO t VALUES (1)"))
        monkeypatch.chdir(second)
        factory.engine.dispose()  # the next scope opens a new connection
        with factory.session_scope() as session:
            session.execute(text("INSERT INTO t VALUES (2)"))
        assert not (second / "relative.sqlite3").exists()
        with sqlite3.connect(first / "relative.sqlite3") as raw:
            assert raw.execute("SELECT n FROM t ORDER BY n").fetchall() == [(1,), (2,)]
    finally:
        factory.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_child_forked_while_a_thread_writes_starts_with_a_free_gate(tmp_path: Path) -> None:
    """gunicorn --preload with a background thread inside a writing scope: the child
    inherited the gate as held for ever, and every write in it failed."""
    factory = DbSessionFactory(f"sqlite:///{tmp_path / 'fork.sqlite3'}", sqlite_busy_timeout=1)
    inside, leave = threading.Event(), threading.Event()

    def write_slowly() -> None:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
            inside.set()
            leave.wait(30)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    try:
        assert inside.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: its own engine on another file, the same process gate code
            code = 1
            try:
                child = DbSessionFactory(
                    f"sqlite:///{tmp_path / 'fork.sqlite3'}", sqlite_busy_timeout=1
                )
                factory.engine.dispose(close=False)
                gate = gate_for(gate_key(str(tmp_path / "fork.sqlite3")))
                gate.acquire(stall=1)  # free in the child, though the parent's thread holds it
                gate.release()
                code = 0 if child is not None else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        leave.set()
        writer.join()
        factory.dispose()


def test_the_slow_scope_warning_names_a_wait_for_the_write_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It blamed "work outside the database" for a writer's wait for the write gate."""
    from dbsession import observability

    factory = DbSessionFactory(f"sqlite:///{tmp_path / 'slow.sqlite3'}")
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
            inside.set()
            leave.wait(10)

    observability.configure(slow_scope_seconds=0.2)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        threading.Timer(0.6, leave.set).start()
        with caplog.at_level("WARNING", logger="dbsession"):
            with factory.session_scope() as session:
                session.execute(text("INSERT INTO t VALUES (1)"))
        holder.join()
        waiter = [r.getMessage() for r in caplog.records if "test_sqlite_gate.py" in r.getMessage()]
        assert any("WAITING FOR SQLite's WRITE LOCK" in message for message in waiter), waiter
    finally:
        leave.set()
        holder.join()
        observability.configure()
        factory.dispose()
