"""Multi-primary MariaDB (a three-node Galera cluster; see tests/cluster_fixtures.py):
threads write through ``run_in_transaction`` on two nodes while the third dies, beside
the same workload on bare SQLAlchemy; then a node left alone (no quorum) raises the
named ClusterUnavailableError, still an SQLAlchemy OperationalError. Recovery times are
printed (run with ``-s``), not asserted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pymysql  # type: ignore[import-untyped]
import pytest
from cluster_fixtures import GaleraCluster, Unit, workload
from cluster_fixtures import galera as galera  # noqa: F401  (the fixture)
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, RetryExhaustedError, RetryPolicy
from dbsession.errors import ClusterUnavailableError

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

THREADS = 2
CLIENTS = [f"{kind}-node{node}" for kind in ("dbsession", "bare") for node in (1, 2)] + [
    "dbsession-hostlist"
]


def _sql(cluster: GaleraCluster, node: int, *statements: str) -> list[Any]:
    with (
        pymysql.connect(
            host="127.0.0.1", port=cluster.nodes[node].port, user="root", database="test"
        ) as conn,
        conn.cursor() as cursor,
    ):
        rows: list[Any] = []
        for statement in statements:
            cursor.execute(statement)
            rows = list(cursor.fetchall())
        conn.commit()
        return rows


@pytest.fixture
def tables(galera: GaleraCluster) -> Iterator[GaleraCluster]:
    _sql(
        galera,
        0,
        "DROP TABLE IF EXISTS item, counter",
        "CREATE TABLE item (k VARCHAR(64) PRIMARY KEY)",
        "CREATE TABLE counter (id VARCHAR(64) PRIMARY KEY, value INTEGER NOT NULL)",
        *(
            f"INSERT INTO counter VALUES ('{client}-{number}', 0)"
            for client in CLIENTS
            for number in range(THREADS)
        ),
    )
    yield galera


def test_cross_node_writes_to_one_row_all_land_through_run_in_transaction(
    tables: GaleraCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """with_for_update() locks on the local node only: two nodes' units on one row do not
    wait for each other, one fails at COMMIT with 1213, and the retry runs it again."""
    caplog.set_level(logging.INFO, logger="dbsession")
    _sql(tables, 0, "DROP TABLE IF EXISTS hot", "CREATE TABLE hot (id INT PRIMARY KEY, value INT)")
    _sql(tables, 0, "INSERT INTO hot VALUES (1, 0)")
    factories = [DbSessionFactory(tables.url(node)) for node in (0, 1)]
    failures: list[BaseException] = []

    def increment(session: Session) -> None:
        value = session.execute(text("SELECT value FROM hot WHERE id = 1 FOR UPDATE")).scalar_one()
        session.execute(text("UPDATE hot SET value = :v WHERE id = 1"), {"v": value + 1})

    def worker(factory: DbSessionFactory) -> None:
        try:
            for _ in range(50):
                factory.transactional(retry=RetryPolicy())(increment)()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(f,)) for f in factories for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for factory in factories:
        factory.dispose()
    conflicts = [r for r in caplog.records if "1213" in r.getMessage()]
    print(
        f"\ngalera cross-node hot row | 200 units, {len(failures)} failed, "
        f"{len(conflicts)} retried 1213"
    )
    assert failures == []
    assert _sql(tables, 1, "SELECT value FROM hot WHERE id = 1") == [(200,)]
    assert conflicts  # the nodes did not wait for each other's locks


def test_a_node_crash_fails_no_unit_on_the_other_nodes(tables: GaleraCluster) -> None:
    runners: dict[str, Callable[[Unit], None]] = {}
    closers: list[Any] = []
    for node in (0, 1):
        url = tables.url(node)
        factory = DbSessionFactory(url)
        bare = create_engine(url, pool_pre_ping=True)
        closers += [factory, bare]

        def with_dbsession(unit: Unit, factory: DbSessionFactory = factory) -> None:
            factory.transactional(retry=RetryPolicy())(unit)()

        def with_sqlalchemy(unit: Unit, bare: Any = bare) -> None:
            with Session(bare) as session, session.begin():
                unit(session)

        runners[f"dbsession-node{node + 1}"] = with_dbsession
        runners[f"bare-node{node + 1}"] = with_sqlalchemy
    # A host list whose first node is the one that dies: new connections skip it.
    first = tables.url(2)
    listed = first.set(host=None, port=None).update_query_pairs(
        [("host", f"127.0.0.1:{tables.nodes[n].port}") for n in (2, 0)]
    )
    listing = DbSessionFactory(listed)
    closers.append(listing)
    runners["dbsession-hostlist"] = lambda unit: listing.transactional(retry=RetryPolicy())(unit)()
    try:
        seen, start, end = workload(
            runners,
            tables.nodes[2].kill,
            threads=THREADS,
            after=lambda: _until(lambda: tables.size(0) == 2),
        )
    finally:
        for closer in closers:
            closer.dispose()
    rows = {row[0] for row in _sql(tables, 0, "SELECT k FROM item")}
    counters = dict(_sql(tables, 1, "SELECT id, value FROM counter"))
    for client in seen.values():
        mine = {key for key in rows if key.startswith(f"{client.name}-")}
        phantom, lost = mine - client.committed - client.unknown, client.committed - mine
        print(
            f"\ngalera node crash | {client.summary(start, end)}, {len(phantom)} phantom, "
            f"{len(lost)} lost"
        )
        for number in range(THREADS):
            row = f"{client.name}-{number}"
            assert counters[row] == sum(key.startswith(f"{row}-") for key in mine)
        if client.name.startswith("dbsession"):
            assert [repr(error) for _, error in client.failures] == []
            assert phantom == set() and lost == set()
            assert len(client.committed) > 0


def _until(check: Callable[[], bool], timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the cluster did not settle"
        time.sleep(0.3)


def test_a_node_without_quorum_raises_the_named_error(tables: GaleraCluster) -> None:
    """Last: the cluster is left without quorum."""
    for node in tables.nodes[1:]:
        if node.process is not None and node.process.poll() is None:
            node.kill()
    _until(lambda: tables.nodes[0].status("wsrep_cluster_status") not in ("Primary", None))
    factory = DbSessionFactory(tables.url(0))
    try:
        with pytest.raises(ClusterUnavailableError) as raised:
            with factory.session_scope() as session:
                session.execute(text("INSERT INTO item (k) VALUES ('alone')"))
        assert isinstance(raised.value, OperationalError)  # what plain SQLAlchemy raised
        assert raised.value.orig is not None and raised.value.orig.args[0] in (1047, 1180)
        assert "primary component" in str(raised.value)

        def write(session: Session) -> None:
            session.execute(text("INSERT INTO item (k) VALUES ('alone')"))

        with pytest.raises(RetryExhaustedError) as exhausted:
            factory.transactional(retry=RetryPolicy(budget=1.0))(write)()
        assert isinstance(exhausted.value.last_error, ClusterUnavailableError)
        assert exhausted.value.attempts > 1  # retried while the budget lasted
    finally:
        factory.dispose()
