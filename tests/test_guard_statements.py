"""The read-only guard of a scope joined to a writing one: every statement tried, with
its outcome, on the backends where it is valid SQL.

A refused statement raises ReadOnlyError before it reaches the server, and the outer
unit of work goes on and commits exactly its own writes; an allowed one runs and
changes nothing. Before the guard became an allow-list it judged the first word only:
EXPLAIN ANALYZE DELETE, SELECT ... INTO, PRAGMA user_version = 42, SET autocommit = 1
(which committed the outer unit's first half on MariaDB) and the rest of the REFUSED
list went through.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from dbsession import DbSessionFactory, ReadOnlyError, _guard

ALL = ("sqlite", "postgresql", "mysql")
PG = ("postgresql",)
MY = ("mysql",)
LITE = ("sqlite",)

REFUSED: list[tuple[str, tuple[str, ...]]] = [
    ("UPDATE guard_t SET n = 9", ALL),
    ("/* why */ DELETE FROM guard_t", ALL),
    ("CREATE TABLE guard_copy AS SELECT n FROM guard_t", ALL),
    ("COMMIT", ALL),
    ("ROLLBACK", ALL),
    ("INSERT OR REPLACE INTO guard_t (n) VALUES (1)", LITE),
    ("PRAGMA user_version = 42", LITE),
    ("PRAGMA user_version(42)", LITE),
    ("PRAGMA main.user_version = 42", LITE),
    ("PRAGMA optimize", LITE),
    ("EXPLAIN ANALYZE DELETE FROM guard_t", PG),
    ("EXPLAIN (ANALYZE, FORMAT JSON) DELETE FROM guard_t", PG),
    ("SELECT n INTO guard_copy FROM guard_t", PG),
    ("WITH gone AS (DELETE FROM guard_t RETURNING n) SELECT n FROM gone", PG),
    (
        "WITH kept AS (SELECT 1 AS n), gone AS (DELETE FROM guard_t RETURNING n) "
        "SELECT n FROM kept",
        PG,
    ),
    ("SELECT n FROM guard_t WHERE n IN (SELECT 1) FOR UPDATE", PG),
    ("SELECT n FROM guard_t FOR SHARE", PG),
    ("SELECT n FROM guard_t FOR NO KEY UPDATE", PG),
    ("SELECT nextval('guard_seq')", PG),
    ("SELECT pg_catalog.setval('guard_seq', 10)", PG),
    ("SELECT set_config('default_transaction_read_only', 'off', true)", PG),
    ("SELECT pg_advisory_xact_lock(42)", PG),
    ("COPY guard_t FROM STDIN", PG),
    ("COPY guard_t TO STDOUT", PG),
    ("DO $$ BEGIN DELETE FROM guard_t; END $$", PG),
    ("CALL guard_proc()", PG + MY),
    ("LOCK TABLE guard_t IN EXCLUSIVE MODE", PG),
    ("SELECT 1; DELETE FROM guard_t", PG),
    ("SELECT 'a\\'; DELETE FROM guard_t; SELECT ''", PG),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", PG + MY),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", PG),
    ("SET transaction_read_only = off", PG),
    ("SET session_replication_role = replica", PG),
    ("SET CONSTRAINTS ALL DEFERRED", PG),
    ("SET ROLE postgres", PG),
    ("NOTIFY guard_channel", PG),
    ("TRUNCATE guard_t", PG + MY),
    ("SET autocommit = 1", MY),
    ("SET @@session.autocommit = 1", MY),
    ("SET SESSION autocommit = 1", MY),
    ("SET @guard_var = 1, autocommit = 1", MY),
    ("SET foreign_key_checks = 0", MY),
    ("ANALYZE DELETE FROM guard_t", MY),
    ("REPLACE INTO guard_t (n) VALUES (1)", MY),
    ("/*!50000 DELETE FROM guard_t */", MY),
    ("SELECT n FROM guard_t LOCK IN SHARE MODE", MY),
    ("SELECT n FROM guard_t FOR UPDATE", MY),
    ("SELECT n INTO @guard_var FROM guard_t", MY),
    ("SELECT GET_LOCK('guard', 0)", MY),
    ("LOCK TABLES guard_t WRITE", MY),
    ("UNLOCK TABLES", MY),
    ("DO (SELECT 1)", MY),
]

ALLOWED: list[tuple[str, tuple[str, ...]]] = [
    ("SELECT n FROM guard_t", ALL),
    ("  /* a */ -- b\n (SELECT n FROM guard_t)", PG + MY),
    ("  /* a */ -- b\n SELECT n FROM guard_t", ALL),
    ("SELECT 'DELETE FROM guard_t; COMMIT' AS note -- UPDATE", ALL),
    ("WITH v AS (SELECT n FROM guard_t) SELECT n FROM v", ALL),
    ("SELECT replace('a', 'a', 'b')", ALL),
    ("SELECT n FROM guard_t WHERE n = (SELECT max(n) FROM guard_t)", ALL),
    ("EXPLAIN SELECT n FROM guard_t", ALL),
    ("EXPLAIN DELETE FROM guard_t", PG + MY),
    ("EXPLAIN QUERY PLAN DELETE FROM guard_t", LITE),
    ("PRAGMA user_version", LITE),
    ("PRAGMA table_info(guard_t)", LITE),
    ("PRAGMA foreign_keys", LITE),
    ("VALUES (1)", PG + LITE),
    ("TABLE guard_t", PG),
    ('SELECT n AS "update" FROM guard_t', PG + LITE),
    ("SELECT E'it\\'s' AS note", PG),
    ("SHOW transaction_isolation", PG),
    ("SET LOCAL statement_timeout = 5000", PG),
    ("SET search_path TO public", PG),
    ("SHOW TABLES", MY),
    ("DESCRIBE guard_t", MY),
    ("SET @guard_var = 1", MY),
    ("SET SESSION max_statement_time = 10", MY),
    ("SET NAMES utf8mb4", MY),
    ("SET STATEMENT max_statement_time = 10 FOR SELECT n FROM guard_t", MY),
    ("SELECT n AS `delete` FROM guard_t", MY),
]


#: Judged without being run: they would change the server for everyone if they got through.
NOT_RUN_REFUSED = [
    "SET GLOBAL max_statement_time = 10",
    "SET @@global.max_statement_time = 10",
    "SET PERSIST max_execution_time = 10",
    "SELECT n FROM guard_t INTO OUTFILE '/tmp/guard'",
    "ALTER SYSTEM SET work_mem = '1GB'",
    "SELECT pg_terminate_backend(42)",
]


@pytest.mark.parametrize("sql", NOT_RUN_REFUSED)
def test_guard_refuses_server_wide_changes_without_running_them(sql: str) -> None:
    assert _guard.writes(sql)


def cases(backend: str) -> list[tuple[str, bool]]:
    return [(sql, True) for sql, where in REFUSED if backend in where] + [
        (sql, False) for sql, where in ALLOWED if backend in where
    ]


@pytest.fixture
def guard_table(factory: DbSessionFactory) -> Iterator[DbSessionFactory]:
    """Table guard_t with one row (1); on the servers a procedure guard_proc that empties
    it; on PostgreSQL a sequence guard_seq."""
    backend = factory.url.get_backend_name()
    setup = ["CREATE TABLE guard_t (n INTEGER)", "INSERT INTO guard_t (n) VALUES (1)"]
    teardown = ["DROP TABLE guard_t", "DROP TABLE IF EXISTS guard_copy"]
    if backend == "postgresql":
        setup += [
            "CREATE SEQUENCE guard_seq",
            "CREATE PROCEDURE guard_proc() LANGUAGE SQL AS $$ DELETE FROM guard_t $$",
        ]
        teardown += ["DROP SEQUENCE guard_seq", "DROP PROCEDURE guard_proc"]
    elif backend == "mysql":
        setup.append("CREATE PROCEDURE guard_proc() DELETE FROM guard_t")
        teardown.append("DROP PROCEDURE guard_proc")
    with factory.engine.begin() as conn:
        for sql in setup:
            conn.exec_driver_sql(sql)
    yield factory
    with factory.engine.begin() as conn:
        for sql in teardown:
            conn.exec_driver_sql(sql)


def check(factory: DbSessionFactory, sql: str, refused: bool) -> None:
    with factory.session_scope() as outer:
        outer.execute(text("INSERT INTO guard_t (n) VALUES (2)"))  # the outer unit's first half
        if refused:
            with pytest.raises(ReadOnlyError, match="refused inside session_scope"):
                with factory.session_scope(readonly=True) as reader:
                    reader.execute(text(sql))
        else:
            with factory.session_scope(readonly=True) as reader:
                reader.execute(text(sql))
        outer.execute(text("INSERT INTO guard_t (n) VALUES (3)"))
    with factory.engine.connect() as conn:  # all of the outer unit, nothing of the inner
        assert sorted(conn.scalars(text("SELECT n FROM guard_t"))) == [1, 2, 3]
    assert _guard.writes(sql) is refused


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize(("sql", "refused"), cases("sqlite"))
def test_guard_on_sqlite(guard_table: DbSessionFactory, sql: str, refused: bool) -> None:
    check(guard_table, sql, refused)


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize(("sql", "refused"), cases("postgresql"))
def test_guard_on_postgresql(guard_table: DbSessionFactory, sql: str, refused: bool) -> None:
    check(guard_table, sql, refused)


@pytest.mark.backends("mysql")
@pytest.mark.parametrize(("sql", "refused"), cases("mysql"))
def test_guard_on_mariadb(guard_table: DbSessionFactory, sql: str, refused: bool) -> None:
    check(guard_table, sql, refused)
