"""Loading many rows at once, inside the current unit of work: ``bulk_insert``.

SQLAlchemy's documented bulk path, ``session.execute(insert(table), rows)``, is an
``executemany``: fine for hundreds of rows, slow for 100,000 (10-13 s on PostgreSQL).
``bulk_insert`` sends the rows the fastest way each backend takes them, on the
session's own connection, so they commit or roll back with the scope:

- PostgreSQL (psycopg 3): ``COPY table (columns) FROM STDIN``, rows streamed with
  psycopg's ``Copy.write_row`` (text format: tabs, newlines, backslashes and NULLs are
  escaped by psycopg).
- SQLite and MySQL/MariaDB (and any other driver with ``?`` or ``%s`` parameters):
  multi-row ``INSERT ... VALUES (...), (...)`` pages, one statement per page.
- Any other driver: SQLAlchemy's ``executemany``.

Values go through each column type's bind processing first (JSON serialised, dates
and decimals as SQLAlchemy sends them to that driver), so the rows read back are the
ones ``session.execute(insert(table), rows)`` would have stored.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Column, Table, insert
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from ._config import scrub
from ._errors import BulkInsertError, bulk_insert_refused
from ._guard import guarded, refusal

#: Rows per multi-row VALUES statement, at most (fewer when the driver's limit of
#: parameters per statement says so).
PAGE_ROWS = 1000
_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def bulk_insert(
    session: Session, table_or_model: Table | type[Any], rows: Iterable[Mapping[str, Any]]
) -> int:
    """Insert ``rows`` (mappings of column key to value) into a table or mapped class,
    inside ``session``'s transaction, the fastest way the backend offers; return the
    number of rows inserted.

    Every row names the same columns (those of the first row); a column left out gets
    its scalar or zero-argument Python ``default``, else the database's default. ORM
    objects are not created, events and relationships are not involved, and pending
    ORM changes are flushed first. The rows go in under a SAVEPOINT: if any row is
    refused, none of them stays and the scope can go on (or roll back as usual).

    On the async side: ``await session.run_sync(bulk_insert, Table, rows)``.

    Raises ReadOnlyError inside a read-only scope joined to a writing one, and
    BulkInsertError (chaining the driver's error, if any) for a row that names
    other columns than the first row, a column the table does not have, or a row the
    database refuses (a constraint, a value of the wrong type).
    """
    table = _table_of(table_or_model)
    if guarded(session):  # PostgreSQL's COPY would pass the guard's SQL check unseen
        raise refusal(f"bulk_insert into {table.name!r}")
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return 0
    keys = list(first)
    columns = _columns(table, keys)
    defaults = _python_defaults(table, keys)
    all_columns = columns + [column for column, _ in defaults]
    dialect = session.get_bind().dialect
    values = _values(dialect, keys, all_columns, defaults, itertools.chain([first], iterator))
    try:
        with session.begin_nested():  # flushes pending changes first
            return _send(session.connection(), table, all_columns, values)
    except DBAPIError as error:
        raise _refused(table, error.orig or error, session) from error
    except dialect.loaded_dbapi.Error as error:  # psycopg's COPY, outside SQLAlchemy
        raise _refused(table, error, session) from error


def _table_of(table_or_model: Table | type[Any]) -> Table:
    if isinstance(table_or_model, Table):
        return table_or_model
    mapper = sa_inspect(table_or_model, raiseerr=False)
    local = getattr(mapper, "local_table", None)
    if not isinstance(local, Table):
        raise BulkInsertError(
            f"bulk_insert() needs a Table or a mapped class, not {table_or_model!r}: "
            "pass Model or Model.__table__."
        )
    return local


def _columns(table: Table, keys: Sequence[str]) -> list[Column[Any]]:
    unknown = [key for key in keys if key not in table.c]
    if unknown:
        raise BulkInsertError(
            f"bulk_insert() into {table.name}: no column {', '.join(map(repr, unknown))} "
            f"(columns: {', '.join(table.c.keys())}). Name rows' values by column key."
        )
    return [table.c[key] for key in keys]


def _python_defaults(table: Table, keys: Sequence[str]) -> list[tuple[Column[Any], Any]]:
    """The columns not given that have a scalar or callable Python default, and the default."""
    found = []
    for column in table.c:
        default: Any = column.default
        if column.key in keys or default is None:
            continue
        if default.is_scalar or default.is_callable:
            found.append((column, default))
    return found


def _values(
    dialect: Dialect,
    keys: Sequence[str],
    columns: Sequence[Column[Any]],
    defaults: Sequence[tuple[Column[Any], Any]],
    rows: Iterable[Mapping[str, Any]],
) -> Iterator[tuple[Any, ...]]:
    """Each row as a tuple in ``columns`` order, bind-processed for ``dialect``."""
    processors: list[Callable[[Any], Any] | None] = [
        column.type.dialect_impl(dialect).bind_processor(dialect) for column in columns
    ]
    width = len(keys)
    plain = not defaults and not any(processors)
    for index, row in enumerate(rows):
        try:
            if len(row) != width:
                raise KeyError(sorted(set(row) ^ set(keys)))
            given = [row[key] for key in keys]
        except (KeyError, TypeError) as error:
            raise BulkInsertError(
                f"bulk_insert(): row {index} does not name the same columns as the first "
                f"row ({', '.join(keys)}); differing: {error}. Give every row the same keys."
            ) from None
        if plain:
            yield tuple(given)
            continue
        given.extend(
            default.arg if default.is_scalar else default.arg(None) for _, default in defaults
        )
        yield tuple(  # None too: JSON stores it as JSON null, as SQLAlchemy does
            value if process is None else process(value)
            for value, process in zip(given, processors, strict=True)
        )


def _send(
    connection: Connection, table: Table, columns: Sequence[Column[Any]], values: Iterable[Any]
) -> int:
    dialect = connection.dialect
    quote = dialect.identifier_preparer
    target = f"{quote.format_table(table)} ({', '.join(quote.quote(c.name) for c in columns)})"
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return _copy(connection, f"COPY {target} FROM STDIN", values)
    placeholder = _PLACEHOLDERS.get(dialect.paramstyle)
    if placeholder is None:  # pragma: no cover (no shipped driver has another paramstyle)
        rows = [dict(zip([c.key for c in columns], row, strict=True)) for row in values]
        connection.execute(insert(table), rows)
        return len(rows)
    per_page = max(1, min(PAGE_ROWS, _parameter_limit(dialect) // len(columns)))
    one = f"({', '.join([placeholder] * len(columns))})"
    head = f"INSERT INTO {target} VALUES "
    full_page = head + ", ".join([one] * per_page)
    count = 0
    iterator = iter(values)
    while page := list(itertools.islice(iterator, per_page)):
        sql = full_page if len(page) == per_page else head + ", ".join([one] * len(page))
        connection.exec_driver_sql(sql, tuple(itertools.chain.from_iterable(page)))
        count += len(page)
    return count


def _parameter_limit(dialect: Dialect) -> int:
    """Parameters one statement may carry: SQLite's SQLITE_MAX_VARIABLE_NUMBER (32766
    since 3.32, 999 before); MySQL's prepared-statement limit (PyMySQL inlines them)."""
    if dialect.name == "sqlite":
        return 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
    return 65535


def _copy(connection: Connection, sql: str, values: Iterable[Any]) -> int:
    driver: Any = connection.connection.driver_connection
    count = 0
    if hasattr(driver, "__aenter__"):  # psycopg's AsyncConnection, reached through run_sync

        async def stream() -> int:
            done = 0
            async with driver.cursor() as cursor, cursor.copy(sql) as copy:
                for row in values:
                    await copy.write_row(row)
                    done += 1
            return done

        return int(await_only(stream()))
    with driver.cursor() as cursor, cursor.copy(sql) as copy:
        for row in values:
            copy.write_row(row)
            count += 1
    return count


def _refused(table: Table, error: BaseException, session: Session) -> BulkInsertError:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return bulk_insert_refused(
        f"bulk_insert() into {table.name}: the database refused a row "
        f"({scrub(line, session.get_bind().engine.url)}); none of the rows was kept. "
        "Fix or drop the offending row and insert again.",
        error,
    )
