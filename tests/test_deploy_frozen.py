"""A frozen server never hangs a scope (issue 25, item 3).

A server that stops (SIGSTOP) while its kernel keeps acknowledging: TCP keepalives and
``tcp_user_timeout`` never fire, PostgreSQL's ``statement_timeout`` is the frozen server's
own, and a pooled connection used in the last 30 s is not pinged. Before the client-side
deadlines, a scope on such a connection hung until the server resumed, ``timeout=``
included. Now ``session_scope(timeout=)`` fails with ScopeTimeoutError and an untimed
scope with ConnectionLostError after ``Timeouts.read``, while the server is still stopped,
and the pool works again once it resumes.

PostgreSQL: a server instance of the test's own (``initdb`` on a free port, its whole
process group stopped with SIGSTOP). MariaDB: the test server behind a ``TcpProxy`` that
turns silent (it keeps accepting and acknowledging, never answers), as a frozen host does.
Each wait runs in a thread joined with a bound: a hang fails the test instead of hanging
the run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from deploy_fixtures import (
    POSTGRES_USER,
    TcpProxy,
    _postgres_bin,
    _private_dir,
    _server_user,
    _spawn_postgres,
    _stop,
    _wait_until,
    free_port,
    unavailable,
)
from helpers import BOUND, within
from sqlalchemy import text
from sqlalchemy.engine import URL

from dbsession import DatabaseUnreachableError, DbSessionFactory, Timeouts
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.errors import CommitOutcomeUnknownError, ConnectionLostError, ScopeTimeoutError

pytestmark = pytest.mark.slow

#: The untimed scopes' bound in these tests (the default is 300 s).
SHORT_READ = Timeouts(connect=2, read=2)


@dataclass
class OwnServer:
    """A PostgreSQL server of the test's own, which the test may stop and resume."""

    port: int
    process: subprocess.Popen[bytes]
    frozen: bool = False

    @property
    def url(self) -> URL:
        return URL.create(
            "postgresql+psycopg",
            username=POSTGRES_USER,
            host="127.0.0.1",
            port=self.port,
            database="postgres",
        )

    def freeze(self) -> None:
        """SIGSTOP the postmaster, then each of its children (every backend calls
        setsid(), so none shares the postmaster's process group)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True
        for pid in self._processes()[1:]:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)
        self.frozen = False

    def _processes(self) -> list[int]:
        """The postmaster's PID, then its children's."""
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rpartition(")")[2].split()[1]) == self.process.pid:
                    children.append(int(entry))
        return [self.process.pid, *children]


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnServer]:
    """A throwaway PostgreSQL server (``initdb`` under a temp folder, a free port), run as
    the postgres user and stopped by PID."""
    binaries = _postgres_bin()
    if binaries is None or not (binaries / "initdb").exists():
        unavailable(
            "A PostgreSQL server of the test's own needs initdb: apt-get install -y postgresql-15."
        )
    folder = _private_dir("dbsession-frozen-")
    data = folder / "data"
    made = subprocess.run(
        [
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-U",
            POSTGRES_USER,
            "--auth=trust",
            "--no-sync",
        ],
        capture_output=True,
        timeout=120,
        **_server_user(),
    )
    if made.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        unavailable(f"initdb failed: {made.stderr.decode(errors='replace')[-400:]}")
    port = free_port()
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{folder}'\nfsync = off\nshared_buffers = 16MB\n"
        )
    process = _spawn_postgres([str(binaries / "postgres"), "-D", str(data)], folder)
    server = OwnServer(port, process)

    def ready() -> bool:
        with psycopg.connect(
            host="127.0.0.1", port=port, user=POSTGRES_USER, dbname="postgres", connect_timeout=3
        ) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    try:
        _wait_until(ready, "a PostgreSQL server of the test's own", process, folder / "log")
        yield server
    finally:
        if server.frozen:
            server.thaw()
        _stop(process, signal.SIGINT)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def server(own_postgres: OwnServer) -> Iterator[OwnServer]:
    yield own_postgres
    if own_postgres.frozen:
        own_postgres.thaw()


def _while_frozen(server: OwnServer, call: Callable[[], Any]) -> BaseException:
    """Run ``call`` (bounded by BOUND) on the frozen server; return what it raised, after
    checking the server was still stopped when it did."""
    server.freeze()
    try:
        with pytest.raises(Exception) as raised:
            within(BOUND, call)
        assert server.frozen  # the scope gave up while the server was still stopped
    finally:
        server.thaw()
    return raised.value


def _scope(factory: DbSessionFactory, timeout: float | None) -> Any:
    with factory.session_scope(timeout=timeout) as session:
        return session.execute(text("SELECT 1")).scalar()


@pytest.mark.parametrize(
    ("timeouts", "timeout", "error"),
    [(None, 2, ScopeTimeoutError), (SHORT_READ, None, ConnectionLostError)],
    ids=["timeout=2", "untimed, read=2"],
)
def test_a_frozen_postgresql_server_does_not_hang_a_sync_scope(
    server: OwnServer, timeouts: Timeouts | None, timeout: float | None, error: type
) -> None:
    factory = DbSessionFactory(server.url, timeouts=timeouts)
    try:
        assert _scope(factory, None) == 1  # the pool now holds a connection used just now
        raised = _while_frozen(server, lambda: _scope(factory, timeout))
        assert isinstance(raised, error), raised
        assert factory.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert within(BOUND, lambda: _scope(factory, timeout)) == 1  # resumed: works again
    finally:
        factory.dispose()


@pytest.mark.parametrize(
    ("timeouts", "timeout", "error"),
    [(None, 2, ScopeTimeoutError), (SHORT_READ, None, ConnectionLostError)],
    ids=["timeout=2", "untimed, read=2"],
)
def test_a_frozen_postgresql_server_does_not_hang_an_async_scope(
    server: OwnServer, timeouts: Timeouts | None, timeout: float | None, error: type
) -> None:
    async def scope(factory: AsyncDbSessionFactory) -> Any:
        async with factory.session_scope(timeout=timeout) as session:
            return (await session.execute(text("SELECT 1"))).scalar()

    loop = asyncio.new_event_loop()
    factory = AsyncDbSessionFactory(server.url, timeouts=timeouts)
    run = loop.run_until_complete
    try:
        assert run(scope(factory)) == 1
        raised = _while_frozen(server, lambda: run(scope(factory)))
        assert isinstance(raised, error), raised
        assert factory.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert within(BOUND, lambda: run(scope(factory))) == 1
    finally:
        run(factory.dispose())
        loop.close()


def test_a_write_stuck_on_a_frozen_server_is_not_applied_when_it_resumes(
    server: OwnServer,
) -> None:
    """The stuck scope fails and rolls back: its INSERT, already sent, never commits on the
    resumed server (a client must not keep writing to a primary that lost its lease)."""
    factory = DbSessionFactory(server.url)
    try:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE IF NOT EXISTS stuck (n int)"))
            session.execute(text("DELETE FROM stuck"))

        def write() -> None:
            with factory.session_scope(timeout=2) as session:
                session.execute(text("INSERT INTO stuck VALUES (1)"))

        assert isinstance(_while_frozen(server, write), ScopeTimeoutError)
        assert within(BOUND, lambda: _scope_count(factory)) == 0
    finally:
        factory.dispose()


def test_a_commit_stuck_on_a_frozen_server_has_an_unknown_outcome(server: OwnServer) -> None:
    """The COMMIT itself got no answer: it may land when the server resumes (it is in the
    server's socket buffer), so the scope says so instead of ScopeTimeoutError's "rolled
    back", and run_in_transaction does not run the unit again."""
    factory = DbSessionFactory(server.url)

    def commit_into_the_freeze() -> None:
        with factory.session_scope(timeout=2) as session:
            session.execute(text("CREATE TABLE IF NOT EXISTS stuck (n int)"))
            server.freeze()

    try:
        with pytest.raises(CommitOutcomeUnknownError):
            within(BOUND, commit_into_the_freeze)
        assert server.frozen
        server.thaw()
        assert factory.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert within(BOUND, lambda: _scope(factory, None)) == 1
    finally:
        factory.dispose()


def _scope_count(factory: DbSessionFactory) -> Any:
    with factory.session_scope() as session:
        return session.execute(text("SELECT count(*) FROM stuck")).scalar()


# --- MariaDB: a silent proxy in front of the test server ---------------------------------


@pytest.fixture
def mariadb_proxy(mysql_url: URL) -> Iterator[tuple[TcpProxy, URL]]:
    proxy = TcpProxy((mysql_url.host or "127.0.0.1", mysql_url.port or 3306))
    yield proxy, mysql_url.set(host="127.0.0.1", port=proxy.port)
    proxy.close()


def _silenced(proxy: TcpProxy, call: Callable[[], Any]) -> BaseException:
    proxy.mode = "silent"
    try:
        with pytest.raises(Exception) as raised:
            within(BOUND, call)
        assert proxy.mode == "silent"
    finally:
        proxy.mode = "forward"
    return raised.value


@pytest.mark.parametrize(
    ("timeouts", "timeout", "error"),
    [(None, 2, ScopeTimeoutError), (SHORT_READ, None, ConnectionLostError)],
    ids=["timeout=2", "untimed, read=2"],
)
def test_a_silent_mariadb_server_does_not_hang_a_scope(
    mariadb_proxy: tuple[TcpProxy, URL],
    timeouts: Timeouts | None,
    timeout: float | None,
    error: type,
) -> None:
    proxy, url = mariadb_proxy
    factory = DbSessionFactory(url, timeouts=timeouts)
    try:
        assert _scope(factory, None) == 1
        raised = _silenced(proxy, lambda: _scope(factory, timeout))
        assert isinstance(raised, error), raised
        assert factory.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert within(BOUND, lambda: _scope(factory, timeout)) == 1
    finally:
        factory.dispose()


@pytest.mark.parametrize(
    ("timeouts", "timeout", "error"),
    [(None, 2, ScopeTimeoutError), (SHORT_READ, None, ConnectionLostError)],
    ids=["timeout=2", "untimed, read=2"],
)
def test_a_silent_mariadb_server_does_not_hang_an_async_scope(
    mariadb_proxy: tuple[TcpProxy, URL],
    timeouts: Timeouts | None,
    timeout: float | None,
    error: type,
) -> None:
    proxy, url = mariadb_proxy

    async def scope(factory: AsyncDbSessionFactory) -> Any:
        async with factory.session_scope(timeout=timeout) as session:
            return (await session.execute(text("SELECT 1"))).scalar()

    loop = asyncio.new_event_loop()
    # Without the liveness check the statement meets the silent server, as any pooled
    # connection used in the last 30 s does (a ping past Timeouts.ping would make the pool
    # reconnect, and aiomysql's wait for a new connection's greeting has no bound).
    factory = AsyncDbSessionFactory(
        url.set(drivername="mysql+aiomysql"), timeouts=timeouts, pool_pre_ping=False
    )
    run = loop.run_until_complete
    try:
        assert run(scope(factory)) == 1
        raised = _silenced(proxy, lambda: run(scope(factory)))
        assert isinstance(raised, error), raised
        assert factory.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert within(BOUND, lambda: run(scope(factory))) == 1
    finally:
        run(factory.dispose())
        loop.close()


def test_pymysql_waits_for_a_silent_servers_greeting_only_within_connect(
    mysql_url: URL,
) -> None:
    """PyMySQL reads the greeting under its read timeout (300 s by default): a server that
    accepted and said nothing held a fresh scope that long. ``connect`` now covers it."""
    silent = TcpProxy(None, mode="silent")
    factory = DbSessionFactory(
        mysql_url.set(host="127.0.0.1", port=silent.port), timeouts=Timeouts(connect=2)
    )
    try:
        with pytest.raises(DatabaseUnreachableError, match="Cannot connect"):
            within(BOUND, lambda: _scope(factory, None))
    finally:
        factory.dispose()
        silent.close()
