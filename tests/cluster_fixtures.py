"""Real high-availability clusters, started for the tests on free 127.0.0.1 ports under a
temporary folder and stopped by PID (fixtures for tests/test_cluster_*):

- ``patroni``: PostgreSQL managed by Patroni: one etcd member as the store, two
  PostgreSQL nodes (``synchronous_mode: true``, so an acknowledged commit is on both),
  and HAProxy in front, routing to whichever node Patroni's REST API calls ``/primary``.
- ``galera``: a three-node MariaDB Galera cluster (``libgalera_smm.so``, gcomm on
  loopback ports, each ``mariadbd`` with its own ``--defaults-file`` and a data folder
  made by ``mariadb-install-db``; the server on 3306 is never touched).

PostgreSQL and MariaDB refuse to run as root: as root, the servers run as the
``postgres`` / ``mysql`` users, in folders they own. As with every real component: under
``CI=true`` one that cannot start fails the test; elsewhere the test is skipped with a
reason that says how to get it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql  # type: ignore[import-untyped]
import pytest
from deploy_fixtures import free_port, unavailable
from sqlalchemy.engine import URL

PG_BIN = Path("/usr/lib/postgresql/15/bin")
GALERA = Path("/usr/lib/galera/libgalera_smm.so")
#: Patroni's leader lease: a crashed leader is replaced after at most this (Patroni's
#: smallest allowed value; the default is 30 s).
TTL = 20
_START_TIMEOUT = 90.0


def _owned_dir(prefix: str, user: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    if os.geteuid() == 0:
        record = pwd.getpwnam(user)
        os.chown(path, record.pw_uid, record.pw_gid)
    return path


def _chown_tree(path: Path, user: str) -> None:
    if os.geteuid() != 0:
        return
    for item in [path, *path.rglob("*")]:
        shutil.chown(item, user, user)


def _spawn(command: list[str], log: Path, user: str | None) -> subprocess.Popen[bytes]:
    as_user: dict[str, Any] = {"user": user} if user and os.geteuid() == 0 else {}
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True, **as_user)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 30) -> None:
    """Signal ``process`` (by PID) and wait for it; SIGKILL it if it overstays."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait(
    check: Callable[[], bool], what: str, logs: list[Path], timeout: float = _START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as error:  # not up yet
            last = error
        time.sleep(0.3)
    tails = " | ".join(
        f"{log.name}: {log.read_text(errors='replace')[-600:]}" for log in logs if log.exists()
    )
    raise RuntimeError(f"{what} did not come up in {timeout:.0f}s ({last!r}); {tails}")


def _need(paths: list[Path | str | None], how: str) -> None:
    missing = [str(path) for path in paths if path is None or not Path(path).exists()]
    if missing:
        unavailable(f"{', '.join(missing)} not found: {how}")


# --- Patroni ---------------------------------------------------------------------------


@dataclass
class PatroniNode:
    """One PostgreSQL node and the Patroni process that manages it."""

    name: str
    port: int
    rest_port: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart) this node's Patroni; it starts its PostgreSQL."""
        self.process = _spawn(["patroni", str(self.config)], self.log, "postgres")

    def answers(self, check: str) -> bool:
        """True if Patroni's REST health ``check`` (``/primary``, ``/sync``) says 200."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_port}{check}", timeout=2):
                return True
        except Exception:
            return False

    def rejoin(self) -> None:
        """Start a crashed node again as a fresh replica (its data folder cloned anew
        from the leader: quicker and surer here than pg_rewind after a SIGKILL)."""
        shutil.rmtree(self.config.parent / "data", ignore_errors=True)
        self.start()

    def role(self) -> str | None:
        """``primary``/``replica`` as Patroni's REST API reports it, None if it is down."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.rest_port}/patroni", timeout=2
            ) as got:
                return str(json.loads(got.read())["role"])
        except Exception:
            return None


@dataclass
class PatroniCluster:
    """A running Patroni cluster: its nodes, the etcd it uses, HAProxy in front."""

    scope: str
    folder: Path
    nodes: list[PatroniNode]
    haproxy_port: int
    etcd_port: int
    config: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, database: str = "postgres", *, via: str = "multihost") -> URL:
        """A psycopg URL: ``via="multihost"`` names both nodes (libpq picks the one that
        takes writes), ``via="haproxy"`` goes through HAProxy."""
        base = URL.create("postgresql+psycopg", username="postgres", database=database)
        if via == "haproxy":
            return base.set(host="127.0.0.1", port=self.haproxy_port)
        hosts = [f"127.0.0.1:{node.port}" for node in self.nodes]
        return base.update_query_dict({"host": hosts, "target_session_attrs": "read-write"})

    def leader(self) -> PatroniNode | None:
        """The node Patroni calls primary right now, if any."""
        return next((node for node in self.nodes if node.role() in ("primary", "master")), None)

    def wait_leader(self, timeout: float = _START_TIMEOUT) -> None:
        """Until a node is primary and HAProxy routes to it."""
        _wait(
            lambda: self.leader() is not None,
            "a Patroni leader",
            [n.log for n in self.nodes],
            timeout,
        )

    def wait_healthy(self, timeout: float = _START_TIMEOUT) -> None:
        """Until one primary and a streaming, synchronous replica are there."""

        def healthy() -> bool:
            roles = sorted(str(node.role()) for node in self.nodes)
            if roles not in (["primary", "replica"], ["master", "replica"]):
                return False
            return all(node.answers("/sync") for node in self.nodes if node is not self.leader())

        try:
            _wait(healthy, "the Patroni cluster", [], timeout)
        except RuntimeError as error:
            listed = subprocess.run(
                ["patronictl", "-c", str(self.config), "list"], capture_output=True, timeout=30
            )
            said = [
                line
                for node in self.nodes
                for line in node.log.read_text(errors="replace").splitlines()[-400:]
                if " INFO: " in line or " ERROR: " in line or "FATAL" in line
            ]
            said = [line for line in said if "no action" not in line][-25:]
            raise RuntimeError(
                f"{error}\n{listed.stdout.decode(errors='replace')}" + "\n".join(said)
            ) from None

    def switchover(self) -> PatroniNode:
        """``patronictl switchover`` to the replica, now; returns the candidate when
        patronictl returned (Patroni has demoted the old leader by then)."""
        leader, candidate = self.leader(), None
        candidate = next(node for node in self.nodes if node is not leader)
        done = subprocess.run(
            [
                "patronictl",
                "-c",
                str(self.config),
                "switchover",
                self.scope,
                "--leader",
                leader.name if leader else "",
                "--candidate",
                candidate.name,
                "--force",
            ],
            capture_output=True,
            timeout=60,
        )
        said = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0 and "Successfully" in said, said
        return candidate

    def kill_leader(self) -> PatroniNode:
        """SIGKILL the leader's Patroni and PostgreSQL (a node crash); returns the node."""
        leader = self.leader()
        assert leader is not None and leader.process is not None
        postmaster = int((leader.config.parent / "data" / "postmaster.pid").read_text().split()[0])
        leader.process.kill()
        leader.process.wait()
        for pid in [postmaster, *_children(postmaster)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leader


def _children(parent: int) -> list[int]:
    """The PIDs whose parent is ``parent`` (a postmaster's backends and workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def _patroni_config(cluster: str, folder: Path, node: PatroniNode, etcd: int) -> str:
    data = folder / node.name / "data"
    return json.dumps(  # YAML is a superset of JSON
        {
            "scope": cluster,
            "namespace": "/dbsession/",
            "name": node.name,
            "restapi": {
                "listen": f"127.0.0.1:{node.rest_port}",
                "connect_address": f"127.0.0.1:{node.rest_port}",
            },
            "etcd3": {"hosts": [f"127.0.0.1:{etcd}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": 1,
                    "retry_timeout": 5,
                    "synchronous_mode": True,
                    "maximum_lag_on_failover": 1048576,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_wal_senders": 5,
                            "max_replication_slots": 5,
                            "max_connections": 100,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.port}",
                "connect_address": f"127.0.0.1:{node.port}",
                "data_dir": str(data),
                "bin_dir": str(PG_BIN),
                "pgpass": str(folder / node.name / "pgpass"),
                "basebackup": [{"checkpoint": "fast"}],  # not spread over minutes under load
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "postgres"},
                    "rewind": {"username": "postgres"},
                },
                "parameters": {
                    "logging_collector": "on",
                    "log_directory": str(folder / node.name),
                    "log_filename": "postgresql.log",
                    "unix_socket_directories": str(folder / node.name),
                    "shared_buffers": "16MB",
                    "fsync": "off",
                },
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
            },
        }
    )


def _haproxy_config(port: int, nodes: list[PatroniNode], folder: Path) -> str:
    servers = "".join(
        f"  server {node.name} 127.0.0.1:{node.port} check port {node.rest_port}\n"
        for node in nodes
    )
    return (
        "global\n  maxconn 400\n"
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30m\n"
        "  timeout server 30m\n  timeout check 1s\n"
        f"listen primary\n  bind 127.0.0.1:{port}\n"
        "  option httpchk GET /primary\n  http-check expect status 200\n"
        "  default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n"
        f"{servers}"
    )


def _start_etcd(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    client, peer = free_port(), free_port()
    log = folder / "etcd.log"
    process = _spawn(
        [
            "etcd",
            "--name",
            "e1",
            "--data-dir",
            str(folder / "etcd"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"e1=http://127.0.0.1:{peer}",
        ],
        log,
        None,
    )

    def up() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=2) as got:
            return bool(json.loads(got.read()).get("health") == "true")

    _wait(up, "etcd", [log], 30)
    return process, client


@pytest.fixture(scope="session")
def patroni() -> Iterator[PatroniCluster]:
    """A Patroni cluster of two PostgreSQL 15 nodes, etcd and HAProxy (see the module)."""
    how = "apt-get install -y patroni etcd-server haproxy postgresql-15 (.ci/run does this)."
    _need(
        [
            shutil.which("patroni"),
            shutil.which("etcd"),
            shutil.which("haproxy"),
            PG_BIN / "postgres",
        ],
        how,
    )
    folder = _owned_dir("dbsession-patroni-", "postgres")
    processes: list[subprocess.Popen[bytes]] = []
    nodes: list[PatroniNode] = []
    cluster: PatroniCluster | None = None
    try:
        etcd, etcd_port = _start_etcd(folder)
        processes.append(etcd)
        scope = f"dbs{uuid.uuid4().hex[:8]}"
        for name in ("pg1", "pg2"):
            (folder / name).mkdir()
            node = PatroniNode(
                name,
                free_port(),
                free_port(),
                folder / name / "patroni.yml",
                folder / name / "patroni.log",
            )
            node.config.write_text(_patroni_config(scope, folder, node, etcd_port))
            nodes.append(node)
        _chown_tree(folder, "postgres")
        nodes[0].start()
        _wait(
            lambda: nodes[0].role() in ("primary", "master"),
            "the first Patroni node",
            [nodes[0].log],
        )
        nodes[1].start()
        haproxy_port = free_port()
        haproxy_cfg = folder / "haproxy.cfg"
        haproxy_cfg.write_text(_haproxy_config(haproxy_port, nodes, folder))
        processes.append(
            _spawn(["haproxy", "-db", "-f", str(haproxy_cfg)], folder / "haproxy.log", None)
        )
        cluster = PatroniCluster(
            scope, folder, nodes, haproxy_port, etcd_port, nodes[0].config, processes
        )
        cluster.wait_healthy()
    except RuntimeError as error:
        _stop_patroni(nodes, processes, folder)
        unavailable(f"The Patroni cluster did not start: {error}")
    assert cluster is not None
    try:
        yield cluster
    finally:
        _stop_patroni(nodes, processes, folder)


def _stop_patroni(
    nodes: list[PatroniNode], processes: list[subprocess.Popen[bytes]], folder: Path
) -> None:
    for node in nodes:  # Patroni stops its PostgreSQL on SIGTERM
        if node.process is not None:
            stop(node.process, signal.SIGTERM, wait=40)
        pid_file = node.config.parent / "data" / "postmaster.pid"
        if pid_file.exists():  # a killed Patroni left its server running
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
            except (ProcessLookupError, ValueError):
                pass
    for process in reversed(processes):
        stop(process)
    if not os.environ.get("DBSESSION_KEEP_CLUSTER"):  # set it to read the servers' logs
        shutil.rmtree(folder, ignore_errors=True)


# --- Galera ----------------------------------------------------------------------------


@dataclass
class GaleraNode:
    """One mariadbd of the Galera cluster."""

    name: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.folder / "my.cnf"

    @property
    def log(self) -> Path:
        return self.folder / "error.log"

    def start(self, *, new_cluster: bool = False) -> None:
        """Start this node (``new_cluster``: bootstrap the cluster from it)."""
        command = ["mariadbd", f"--defaults-file={self.config}"]
        self.process = _spawn(
            command + (["--wsrep-new-cluster"] if new_cluster else []),
            self.folder / "stdout.log",
            "mysql",
        )

    def status(self, name: str) -> str | None:
        """A ``wsrep_*`` status value, None if the node does not answer."""
        try:
            with pymysql.connect(
                host="127.0.0.1", port=self.port, user="root", connect_timeout=2
            ) as conn:
                with conn.cursor() as cursor:
                    cursor.execute("SHOW STATUS LIKE %s", (name,))
                    row = cursor.fetchone()
                    return None if row is None else str(row[1])
        except Exception:
            return None

    def ready(self) -> bool:
        """True once the node takes transactions (``wsrep_ready``)."""
        return self.status("wsrep_ready") == "ON"

    def kill(self) -> None:
        """SIGKILL this node (a crash)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()


@dataclass
class GaleraCluster:
    """A running three-node Galera cluster."""

    nodes: list[GaleraNode]
    folder: Path

    def url(self, node: int = 0, database: str = "test") -> URL:
        """A PyMySQL URL on one node."""
        return URL.create(
            "mysql+pymysql",
            username="root",
            host="127.0.0.1",
            port=self.nodes[node].port,
            database=database,
        )

    def size(self, node: int = 0) -> int:
        """The cluster size as ``node`` sees it (0 if it does not answer)."""
        return int(self.nodes[node].status("wsrep_cluster_size") or 0)


def _galera_config(
    node: GaleraNode, cluster: str, gcomm: list[int], index: int, ports: dict[str, int]
) -> str:
    members = ",".join(f"127.0.0.1:{port}" for port in gcomm)
    return (
        "[mysqld]\n"
        f"datadir={node.folder / 'data'}\nsocket={node.folder / 'mysqld.sock'}\n"
        f"port={node.port}\nbind-address=127.0.0.1\npid-file={node.folder / 'mysqld.pid'}\n"
        f"log-error={node.log}\nskip-grant-tables\nskip-name-resolve\n"
        "binlog_format=ROW\ndefault_storage_engine=InnoDB\ninnodb_autoinc_lock_mode=2\n"
        "innodb_buffer_pool_size=32M\ninnodb_log_file_size=16M\ninnodb_flush_log_at_trx_commit=0\n"
        "performance_schema=OFF\n"
        f"wsrep_on=ON\nwsrep_provider={GALERA}\nwsrep_cluster_name={cluster}\n"
        f"wsrep_cluster_address=gcomm://{members}\nwsrep_node_name={node.name}\n"
        f"wsrep_node_address=127.0.0.1:{gcomm[index]}\n"
        f'wsrep_provider_options="gmcast.listen_addr=tcp://127.0.0.1:{gcomm[index]};'
        f'ist.recv_addr=127.0.0.1:{ports["ist"]};gcache.size=16M"\n'
        f"wsrep_sst_method=rsync\nwsrep_sst_receive_address=127.0.0.1:{ports['sst']}\n"
    )


@pytest.fixture(scope="session")
def galera() -> Iterator[GaleraCluster]:
    """A three-node MariaDB Galera cluster on free ports (see the module)."""
    how = "apt-get install -y galera-4 mariadb-server rsync (.ci/run does this)."
    _need(
        [
            GALERA,
            shutil.which("mariadbd"),
            shutil.which("mariadb-install-db"),
            shutil.which("rsync"),
        ],
        how,
    )
    folder = _owned_dir("dbsession-galera-", "mysql")
    cluster_name = f"dbs{uuid.uuid4().hex[:8]}"
    gcomm = [free_port() for _ in range(3)]
    nodes = [GaleraNode(f"g{i + 1}", free_port(), folder / f"g{i + 1}") for i in range(3)]
    try:
        for index, node in enumerate(nodes):
            node.folder.mkdir()
            ports = {"ist": free_port(), "sst": free_port()}
            node.config.write_text(_galera_config(node, cluster_name, gcomm, index, ports))
            _chown_tree(node.folder, "mysql")
        first = nodes[0]
        made = subprocess.run(
            [
                "mariadb-install-db",
                f"--defaults-file={first.config}",
                "--user=mysql",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            timeout=120,
        )
        if made.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed: {made.stderr.decode(errors='replace')[-600:]}"
            )
        first.start(new_cluster=True)
        _wait(first.ready, "the first Galera node", [first.log])
        with (
            pymysql.connect(host="127.0.0.1", port=first.port, user="root") as conn,
            conn.cursor() as cursor,
        ):
            cursor.execute("CREATE DATABASE IF NOT EXISTS test")
        for node in nodes[1:]:  # joiners get the data by SST (rsync)
            (node.folder / "data").mkdir()
            _chown_tree(node.folder, "mysql")
            node.start()
            _wait(node.ready, f"Galera node {node.name}", [node.log])
        cluster = GaleraCluster(nodes, folder)
        _wait(lambda: cluster.size() == 3, "a three-node Galera cluster", [n.log for n in nodes])
    except RuntimeError as error:
        _stop_galera(nodes, folder)
        unavailable(f"The Galera cluster did not start: {error}")
    try:
        yield cluster
    finally:
        _stop_galera(nodes, folder)


def _stop_galera(nodes: list[GaleraNode], folder: Path) -> None:
    for node in reversed(nodes):
        if node.process is not None:
            stop(node.process, signal.SIGTERM, wait=30)
    shutil.rmtree(folder, ignore_errors=True)


# --- Workload --------------------------------------------------------------------------

Unit = Callable[[Any], None]


@dataclass
class Client:
    """What one population of client threads saw: the keys it believes committed, the
    ones whose COMMIT outcome it was told is unknown, the errors it got, and when."""

    name: str
    committed: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    failures: list[tuple[float, BaseException]] = field(default_factory=list)
    commits_at: list[float] = field(default_factory=list)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time in [start, end] without a commit: how long the event stopped
        this client (its recovery time)."""
        times = sorted([start, *(t for t in self.commits_at if start <= t <= end), end])
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def summary(self, start: float, end: float) -> str:
        kinds = sorted({type(error).__name__ for _, error in self.failures})
        return (
            f"{self.name}: {len(self.committed)} committed, {len(self.failures)} failed units "
            f"{kinds or ''}, {len(self.unknown)} unknown, no commit for "
            f"{self.longest_gap(start, end):.1f}s"
        )


def workload(
    clients: dict[str, Callable[[Unit], None]],
    event: Callable[[], object],
    *,
    threads: int = 3,
    before: float = 2.0,
    after: Callable[[], object] = lambda: None,
) -> tuple[dict[str, Client], float, float]:
    """Run ``threads`` threads per client, each inserting uniquely-keyed rows into
    ``item`` and adding 1 to its row of ``counter`` in one unit, through that client's
    runner (``run(unit)``); ``event()`` after ``before`` seconds, then ``after()`` (wait
    for the cluster to be whole again) and one more second. Returns what each client
    saw and the event's start and end (``time.monotonic()``)."""
    import threading

    from sqlalchemy import text

    from dbsession.errors import CommitOutcomeUnknownError

    stopping = threading.Event()
    seen = {name: Client(name) for name in clients}
    lock = threading.Lock()

    def worker(name: str, number: int) -> None:
        run, client = clients[name], seen[name]
        row = f"{name}-{number}"
        n = 0
        while not stopping.is_set():
            n += 1
            key = f"{row}-{n}"

            def unit(session: Any, key: str = key) -> None:
                session.execute(text("INSERT INTO item (k) VALUES (:k)"), {"k": key})
                session.execute(
                    text("UPDATE counter SET value = value + 1 WHERE id = :id"), {"id": row}
                )

            try:
                run(unit)
            except CommitOutcomeUnknownError:
                with lock:
                    client.unknown.add(key)
            except Exception as error:
                with lock:
                    client.failures.append((time.monotonic(), error))
                time.sleep(0.05)  # a bare client's retry pace
            else:
                with lock:
                    client.committed.add(key)
                    client.commits_at.append(time.monotonic())

    pool = [
        threading.Thread(target=worker, args=(name, number), daemon=True)
        for name in clients
        for number in range(threads)
    ]
    for thread in pool:
        thread.start()
    time.sleep(before)
    start = time.monotonic()
    event()
    after()
    time.sleep(1.0)
    end = time.monotonic()
    stopping.set()
    for thread in pool:
        thread.join(timeout=120)
    return seen, start, end
