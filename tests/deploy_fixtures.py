"""The real components of a deployment, started for the tests: PgBouncer, a streaming
replica, and TCP proxies that can stay silent or refuse.

- ``pgbouncer`` / ``pgbouncer_session``: the Debian ``pgbouncer`` binary as its own process
  on a free 127.0.0.1 port, with a generated config (``pool_mode=transaction`` / ``session``)
  in front of the test PostgreSQL server; stopped by PID at the end.
- ``replica``: a PostgreSQL hot standby made with ``pg_basebackup -R -X stream`` from the
  test server, on a free port; stopped by PID and removed at the end.
- ``silent_server``: accepts TCP connections and never answers.
- ``TcpProxy``: forwards to a server, and can be switched to silent or refusing.

As with the database servers: under ``CI=true`` a component that cannot start fails the
test; elsewhere the test is skipped with a reason that says how to get it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
from sqlalchemy.engine import URL

POSTGRES_USER = "postgres"
_START_TIMEOUT = 30.0


def unavailable(message: str) -> NoReturn:
    """Fail under CI=true, else skip, with ``message`` saying how to get the component."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_user() -> dict[str, Any]:
    """PgBouncer and PostgreSQL refuse to run as root: run them as ``postgres`` then."""
    return {"user": POSTGRES_USER} if os.geteuid() == 0 else {}


def _private_dir(prefix: str) -> Path:
    """A fresh folder the server user owns (under /tmp: pytest's own is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        record = pwd.getpwnam(POSTGRES_USER)
        os.chown(path, record.pw_uid, record.pw_gid)
    return path


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until(check: Any, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if check():
                return
        except Exception as error:  # not up yet
            last = error
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
    _stop(process)
    unavailable(f"{what} did not come up ({last!r}); its log ends: {tail}")


@dataclass
class Bouncer:
    """A running PgBouncer: where it listens and how to reach its admin console."""

    port: int
    pool_mode: str
    process: subprocess.Popen[bytes]

    def url(self, database: URL) -> URL:
        """``database`` (a URL on the test PostgreSQL server) reached through this PgBouncer."""
        return database.set(host="127.0.0.1", port=self.port)

    def admin(self, command: str) -> None:
        """Run a command on the admin console (``KILL db``, ``RESUME db``, ...)."""
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=POSTGRES_USER,
            dbname="pgbouncer",
            autocommit=True,
            connect_timeout=5,
        ) as conn:
            conn.execute(command)


def _start_bouncer(postgresql_url: URL, pool_mode: str) -> Iterator[Bouncer]:
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if binary is None:
        unavailable(
            "PgBouncer is not installed: apt-get install -y pgbouncer (the .ci/run script "
            "does this)."
        )
    folder = _private_dir(f"dbsession-pgbouncer-{pool_mode}-")
    port = free_port()
    users = sorted({POSTGRES_USER, "root", postgresql_url.username or POSTGRES_USER})
    (folder / "users.txt").write_text("".join(f'"{user}" ""\n' for user in users))
    config = folder / "pgbouncer.ini"
    log = folder / "pgbouncer.log"
    config.write_text(
        "[databases]\n"
        f"* = host={postgresql_url.host or '127.0.0.1'} port={postgresql_url.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        f"admin_users = {POSTGRES_USER}\n"
        f"pool_mode = {pool_mode}\n"
        "max_client_conn = 200\ndefault_pool_size = 4\nmin_pool_size = 0\n"
        "server_check_delay = 0\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {log}\n"
    )
    for path in folder.iterdir():
        shutil.chown(path, *(2 * [POSTGRES_USER] if os.geteuid() == 0 else [None, None]))
    process = subprocess.Popen(
        [binary, str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **_server_user(),
    )

    def ready() -> bool:
        with psycopg.connect(
            host="127.0.0.1",
            port=port,
            user=POSTGRES_USER,
            dbname=postgresql_url.database,
            connect_timeout=3,
        ) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    try:
        _wait_until(ready, f"PgBouncer ({pool_mode} mode)", process, log)
        yield Bouncer(port, pool_mode, process)
    finally:
        _stop(process, signal.SIGINT)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pgbouncer(postgresql_url: URL) -> Iterator[Bouncer]:
    """A PgBouncer in transaction pooling mode in front of the test PostgreSQL server."""
    yield from _start_bouncer(postgresql_url, "transaction")


@pytest.fixture(scope="session")
def pgbouncer_session(postgresql_url: URL) -> Iterator[Bouncer]:
    """A PgBouncer in session pooling mode in front of the test PostgreSQL server."""
    yield from _start_bouncer(postgresql_url, "session")


@dataclass
class Replica:
    """A running hot standby of the test PostgreSQL server."""

    port: int
    folder: Path
    command: list[str]
    process: subprocess.Popen[bytes]

    def url(self, database: URL) -> URL:
        """``database`` (a URL on the primary) on this replica."""
        return database.set(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        """Shut the replica down (fast shutdown) and wait for it."""
        _stop(self.process, signal.SIGINT)

    def start(self) -> None:
        """Start the replica again after ``stop()`` and wait until it serves reads."""
        self.process = _spawn_postgres(self.command, self.folder)
        _wait_until(
            lambda: _in_recovery(self.port), "the replica", self.process, self.folder / "log"
        )


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres")
    return Path(postgres).parent if postgres else None


def _in_recovery(port: int) -> bool:
    with psycopg.connect(
        host="127.0.0.1", port=port, user=POSTGRES_USER, dbname="postgres", connect_timeout=3
    ) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return row is not None and row[0] is True


def _spawn_postgres(command: list[str], folder: Path) -> subprocess.Popen[bytes]:
    with open(folder / "log", "ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=log, start_new_session=True, **_server_user()
        )


def _allow_replication(primary: psycopg.Connection[Any]) -> None:
    """Add a replication line for 127.0.0.1 to the primary's pg_hba.conf if it has none."""
    row = primary.execute(
        "SELECT count(*) FROM pg_hba_file_rules WHERE 'replication' = ANY(database) "
        "AND (address IS NULL OR address = '127.0.0.1' OR address = '0.0.0.0')"
        " AND type LIKE 'host%'"
    ).fetchone()
    if row is not None and row[0] > 0:
        return
    hba = primary.execute("SHOW hba_file").fetchone()
    assert hba is not None
    with open(hba[0], "a") as handle:
        handle.write("\n# added by the dbsession tests: streaming replicas on this host\n")
        handle.write("host replication all 127.0.0.1/32 trust\n")
    primary.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)


@pytest.fixture(scope="session")
def replica(postgresql_url: URL) -> Iterator[Replica]:
    """A streaming replica of the test server, made with ``pg_basebackup -R -X stream``."""
    how = (
        "needs PostgreSQL's server binaries (pg_basebackup, postgres) and permission to "
        "add 'host replication all 127.0.0.1/32 trust' to the server's pg_hba.conf"
    )
    binaries = _postgres_bin()
    if binaries is None or not (binaries / "pg_basebackup").exists():
        unavailable(f"A streaming replica {how}: apt-get install -y postgresql-15.")
    host, port = postgresql_url.host or "127.0.0.1", postgresql_url.port or 5432
    try:
        with psycopg.connect(
            host=host, port=port, user=POSTGRES_USER, dbname="postgres", autocommit=True
        ) as primary:
            _allow_replication(primary)
    except (psycopg.Error, OSError) as error:
        unavailable(f"A streaming replica {how} ({type(error).__name__}: {error}).")
    folder = _private_dir("dbsession-replica-")
    data = folder / "data"
    backup = subprocess.run(
        [
            str(binaries / "pg_basebackup"),
            *("-h", host, "-p", str(port), "-U", POSTGRES_USER, "-D", str(data)),
            *("-R", "-X", "stream", "--checkpoint=fast"),
        ],
        capture_output=True,
        timeout=300,
        **_server_user(),
    )
    if backup.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        unavailable(f"pg_basebackup failed ({backup.stderr.decode(errors='replace')}); {how}.")
    replica_port = free_port()
    (data / "postgresql.conf").write_text(
        f"port = {replica_port}\nlisten_addresses = '127.0.0.1'\n"
        f"unix_socket_directories = '{folder}'\nhot_standby = on\n"
        "max_standby_streaming_delay = 1s\n"
        "shared_buffers = 16MB\nlogging_collector = off\n"
    )
    (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    (data / "pg_ident.conf").write_text("")
    if os.geteuid() == 0:
        for path in (data / "postgresql.conf", data / "pg_hba.conf", data / "pg_ident.conf"):
            shutil.chown(path, POSTGRES_USER, POSTGRES_USER)
    command = [str(binaries / "postgres"), "-D", str(data)]
    process = _spawn_postgres(command, folder)
    server = Replica(replica_port, folder, command, process)
    try:
        _wait_until(lambda: _in_recovery(replica_port), "the replica", process, folder / "log")
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


class TcpProxy:
    """A TCP proxy on a free 127.0.0.1 port in front of ``target`` (host, port).

    ``mode``: ``"forward"`` passes bytes both ways; ``"silent"`` accepts and reads but
    never answers (a frozen host); ``"refuse"`` closes every connection at once (a server
    that is down). Switching mode applies to connections already open too.
    """

    def __init__(self, target: tuple[str, int] | None, mode: str = "forward") -> None:
        self.target = target
        self.mode = mode
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            self._sockets.append(client)
            upstream: socket.socket | None = None
            if self.mode == "forward" and self.target is not None:
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                    self._sockets.append(upstream)
                except OSError:
                    client.close()
                    continue
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            if upstream is not None:
                threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket | None) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data or self.mode == "refuse":
                    break
                if self.mode == "forward" and sink is not None:
                    sink.sendall(data)
        for sock in (source, sink):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def refuse(self) -> None:
        """From now on close every connection, and cut the open ones."""
        self.mode = "refuse"
        self._cut()

    def _cut(self) -> None:
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._closed = True
        self.mode = "refuse"
        self._listener.close()
        self._cut()


@pytest.fixture
def silent_server() -> Iterator[TcpProxy]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    proxy = TcpProxy(None, mode="silent")
    yield proxy
    proxy.close()
