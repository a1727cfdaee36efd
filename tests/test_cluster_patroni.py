"""A unit of work rides through a PostgreSQL failover (Patroni, etcd, HAProxy; see
tests/cluster_fixtures.py): threads write uniquely-keyed rows and counters through
``run_in_transaction`` while the leader changes; beside them, the same workload on bare
SQLAlchemy. Asserted for dbsession: no failed unit, no phantom row (in the database but
not believed committed, unless reported unknown), no lost row (``synchronous_mode``).
The recovery time of each client is printed (run with ``-s``), not asserted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from cluster_fixtures import Client, PatroniCluster, Unit, workload
from cluster_fixtures import patroni as patroni  # noqa: F401  (the fixture)
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, RetryPolicy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.cluster,
    # psycopg drops (unclosed) the connection to a standby that a multi-host URL's
    # target_session_attrs=read-write turned down: its own, for both clients
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function BaseConnection.__del__"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]

THREADS = 3


CLIENTS = [f"{kind}-{via}" for kind in ("dbsession", "bare") for via in ("multihost", "haproxy")]


@pytest.fixture
def tables(patroni: PatroniCluster) -> Iterator[PatroniCluster]:
    """Tables ``item`` (unique keys) and ``counter`` (one row per client thread)."""
    patroni.wait_healthy()
    url = patroni.url(via="haproxy")
    with psycopg.connect(
        host=url.host, port=url.port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute("DROP TABLE IF EXISTS item, counter")
        conn.execute("CREATE TABLE item (k text PRIMARY KEY)")
        conn.execute("CREATE TABLE counter (id text PRIMARY KEY, value integer NOT NULL)")
        for client in CLIENTS:
            for number in range(THREADS):
                conn.execute("INSERT INTO counter VALUES (%s, 0)", (f"{client}-{number}",))
    yield patroni


def _clients(
    cluster: PatroniCluster, policy: RetryPolicy
) -> tuple[dict[str, Callable[[Unit], None]], list[Any]]:
    """dbsession's run_in_transaction and bare SQLAlchemy, each through a multi-host URL
    and through HAProxy."""
    runners: dict[str, Callable[[Unit], None]] = {}
    closers: list[Any] = []
    for via in ("multihost", "haproxy"):
        url = cluster.url(via=via)
        factory = DbSessionFactory(url)
        bare = create_engine(url, pool_pre_ping=True)
        closers += [factory, bare]

        def with_dbsession(unit: Unit, factory: DbSessionFactory = factory) -> None:
            factory.transactional(retry=policy)(unit)()

        def with_sqlalchemy(unit: Unit, bare: Any = bare) -> None:
            with Session(bare) as session, session.begin():
                unit(session)

        runners[f"dbsession-{via}"] = with_dbsession
        runners[f"bare-{via}"] = with_sqlalchemy
    return runners, closers


def _check(
    cluster: PatroniCluster, event: str, seen: dict[str, Client], start: float, end: float
) -> None:
    url = cluster.url(via="haproxy")
    with psycopg.connect(host=url.host, port=url.port, user="postgres", dbname="postgres") as conn:
        rows = {row[0] for row in conn.execute("SELECT k FROM item")}
        counters: dict[str, int] = dict(conn.execute("SELECT id, value FROM counter").fetchall())
    for client in seen.values():
        mine = {key for key in rows if key.startswith(f"{client.name}-")}
        phantom = mine - client.committed - client.unknown
        lost = client.committed - mine
        print(f"\n{event} | {client.summary(start, end)}, {len(phantom)} phantom, {len(lost)} lost")
        for number in range(THREADS):  # a unit's row and its count commit together
            row = f"{client.name}-{number}"
            assert counters[row] == sum(key.startswith(f"{row}-") for key in mine)
        if client.name.startswith("dbsession"):
            assert [repr(error) for _, error in client.failures] == []
            assert phantom == set()
            assert lost == set()  # synchronous_mode: an acknowledged commit survives
            assert len(client.committed) > 0


def test_a_switchover_fails_no_unit(tables: PatroniCluster) -> None:
    clients, closers = _clients(tables, RetryPolicy())
    try:
        seen, start, end = workload(
            clients, lambda: tables.switchover(), threads=THREADS, after=tables.wait_healthy
        )
    finally:
        for closer in closers:
            closer.dispose()
    _check(tables, "switchover", seen, start, end)


def test_a_leader_crash_fails_no_unit_with_the_longer_window(tables: PatroniCluster) -> None:
    """Last: the crashed node stays down (the session's cluster has one node after it)."""
    clients, closers = _clients(tables, RetryPolicy(budget=60.0))
    try:
        seen, start, end = workload(
            clients, lambda: tables.kill_leader(), threads=THREADS, after=tables.wait_leader
        )
    finally:
        for closer in closers:
            closer.dispose()
    _check(tables, "leader crash", seen, start, end)
