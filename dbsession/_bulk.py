"""Loading many rows at once, inside the current unit of work: ``bulk_insert``.

SQLAlchemy's documented bulk path, ``session.execute(insert(table), rows)``, is an
``executemany``: fine for hundreds of rows, slow for 100,000 (2.7-4.4 s on PostgreSQL,
where ``bulk_insert`` takes 0.17-0.36 s, within 1.07x of psycopg's own COPY: ``python
benchmarks/bench.py --only bulkpath``, benchmarks/RESULTS.md). ``bulk_insert`` sends
the rows the fastest way each backend takes them, on the session's own connection, so
they commit or roll back with the scope:

- PostgreSQL (psycopg 3): ``COPY table (columns) FROM STDIN``, rows streamed with
  psycopg's ``Copy.write_row`` (text format: tabs, newlines, backslashes and NULLs are
  escaped by psycopg).
- SQLite and MySQL/MariaDB (and any other driver with ``?`` or ``%s`` parameters):
  multi-row ``INSERT ... VALUES (...), (...)`` pages, one statement per page.
- Any other driver: SQLAlchemy's ``executemany``.

Values go through each column type's bind processing first (JSON serialised, dates
and decimals as SQLAlchemy sends them to that driver), a single-table-inheritance
subclass gets its discriminator, and columns left out get their scalar or plain
callable Python default, so the rows read back are the ones
``session.execute(insert(table), rows)`` would have stored. What the fast paths cannot
reproduce exactly (a type's ``bind_expression``, a default that is an SQL expression,
a sequence or a function of the execution context, joined-table inheritance) goes
through SQLAlchemy's own ``insert()`` instead. MySQL/MariaDB pages are sized by bytes
too (PyMySQL sends the values inside the statement): each stays under the server's
``max_allowed_packet``, read once per connection.

The rows are made tuples a page (1,000 rows) at a time, column by column at C speed
(``operator.itemgetter``, ``map``, ``zip``): a column whose type has no bind processor
for the dialect costs no Python call per value, a ``Boolean`` page of True/False/None
looks its three results up, and only the other processors (SQLite's dates, JSON...)
and callable defaults are called once per value, as insert() calls them.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import functools
import inspect
import itertools
import operator
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Boolean, Column, Table, bindparam, insert
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ._classify import is_read_only_violation
from ._config import scrub
from ._errors import BulkInsertError, ReadOnlyError, bulk_insert_refused
from ._guard import guarded, refusal

#: Rows per multi-row VALUES statement, at most (fewer when the driver's limit of
#: parameters per statement says so).
PAGE_ROWS = 1000
_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
#: ``connection.info`` key (per pooled driver connection): the server's max_allowed_packet.
_PACKET_KEY = "dbsession_max_allowed_packet"
#: Bytes of a statement's own text, and of each value's quoting, counted on top of values.
_STATEMENT_SLACK = 64 * 1024


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
    table, identity, exact_target = _target(table_or_model)
    if guarded(session):  # PostgreSQL's COPY would pass the guard's SQL check unseen
        raise refusal(f"bulk_insert into {table.name!r}")
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return 0
    keys = list(first)
    if exact_target:
        columns = _columns(table, keys)
        constants = [identity] if identity is not None and identity[0].key not in keys else []
        given = [*keys, *(column.key for column, _ in constants)]
        defaults = _python_defaults(table, given)
    else:  # joined-table inheritance: the ORM's insert() fills each table
        _attributes(table_or_model, keys)
        columns, constants, defaults = [], [], []
    dialect = session.get_bind().dialect
    all_rows = itertools.chain([first], iterator)
    try:
        with session.begin_nested():  # flushes pending changes first
            if not exact_target or not _fast_path_is_exact(dialect, columns, defaults):
                return _insert(session, table_or_model, exact_target, keys, constants, all_rows)
            defaults = constants + defaults
            all_columns = columns + [column for column, _ in defaults]
            connection = session.connection()
            per_page = _rows_per_page(dialect, len(all_columns))
            pages = _pages(dialect, keys, all_columns, defaults, all_rows, per_page)
            return _send(connection, table, all_columns, pages)
    except ReadOnlyError:
        raise
    except DBAPIError as error:
        if error.connection_invalidated:  # the connection was lost, not a row refused
            raise
        raise _refused(table, error.orig or error, session) from error
    except dialect.loaded_dbapi.Error as error:  # psycopg's COPY, outside SQLAlchemy
        if is_read_only_violation(error, dialect.name):
            raise ReadOnlyError(
                f"bulk_insert() into {table.name} was refused: the transaction is read-only "
                "(session_scope(readonly=True) never writes). Do it in a writing scope.",
                orig=error,
            ) from error
        raise _refused(table, error, session) from error


def _target(
    table_or_model: Table | type[Any],
) -> tuple[Table, tuple[Column[Any], Any] | None, bool]:
    """The table rows go to; for a single-table-inheritance subclass, its discriminator
    column and value; False when the model spans several tables (joined inheritance)."""
    table = _table_of(table_or_model)
    if isinstance(table_or_model, Table):
        return table, None, True
    mapper: Any = sa_inspect(table_or_model)
    if mapper.local_table is not mapper.persist_selectable:
        return table, None, False
    on = mapper.polymorphic_on
    if isinstance(on, Column) and mapper.polymorphic_identity is not None and on.table is table:
        return table, (on, mapper.polymorphic_identity), True
    return table, None, True


def _fast_path_is_exact(
    dialect: Dialect, columns: Sequence[Column[Any]], defaults: Sequence[tuple[Column[Any], Any]]
) -> bool:
    """True unless a column's type wraps its value in SQL (``bind_expression``) or a
    default needs SQL or the execution context (then SQLAlchemy's insert() does it)."""
    for column in [*columns, *(column for column, _ in defaults)]:
        impl = column.type.dialect_impl(dialect)
        if impl.bind_expression(bindparam(column.key, type_=column.type)) is not None:
            return False
    return all(
        default.is_scalar or _context_free(getattr(default, "arg", None)) for _, default in defaults
    )


def _context_free(function: Any) -> bool:
    """True if SQLAlchemy wrapped ``function`` because it takes no argument (a default
    taking the execution context is kept as it is)."""
    wrapped = getattr(function, "__wrapped__", None)
    if wrapped is None:
        return False
    try:
        parameters = inspect.signature(wrapped).parameters.values()
    except (TypeError, ValueError):  # a builtin: SQLAlchemy wrapped it for the same reason
        return True
    return not any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in parameters
    )


def _insert(
    session: Session,
    table_or_model: Table | type[Any],
    exact_target: bool,
    keys: Sequence[str],
    constants: Sequence[tuple[Column[Any], Any]],
    rows: Iterable[Mapping[str, Any]],
) -> int:
    """SQLAlchemy's own ``insert()`` (an executemany): exact whatever the table."""
    extra = {column.key: value for column, value in constants}
    mappings = [
        {**dict(zip(keys, row, strict=True)), **extra}
        for page in _pages(None, keys, [], [], rows)
        for row in page
    ]
    if exact_target:
        session.connection().execute(insert(_table_of(table_or_model)), mappings)
    else:  # joined-table inheritance: the ORM fills every table of the model
        session.execute(insert(table_or_model), mappings)
    return len(mappings)


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


def _attributes(model: Any, keys: Sequence[str]) -> None:
    known = sa_inspect(model).column_attrs.keys()
    unknown = [key for key in keys if key not in known]
    if unknown:
        raise BulkInsertError(
            f"bulk_insert() into {model.__name__}: no attribute "
            f"{', '.join(map(repr, unknown))} (attributes: {', '.join(known)})."
        )


def _columns(table: Table, keys: Sequence[str]) -> list[Column[Any]]:
    unknown = [key for key in keys if key not in table.c]
    if unknown:
        raise BulkInsertError(
            f"bulk_insert() into {table.name}: no column {', '.join(map(repr, unknown))} "
            f"(columns: {', '.join(table.c.keys())}). Name rows' values by column key."
        )
    return [table.c[key] for key in keys]


def _python_defaults(table: Table, keys: Sequence[str]) -> list[tuple[Column[Any], Any]]:
    """The columns not given that have a Python-side default (``default=``), and it."""
    return [
        (column, column.default)
        for column in table.c
        if column.key not in keys and column.default is not None
    ]


def _pages(
    dialect: Dialect | None,
    keys: Sequence[str],
    columns: Sequence[Column[Any]],
    defaults: Sequence[tuple[Column[Any], Any]],
    rows: Iterable[Mapping[str, Any]],
    per_page: int = PAGE_ROWS,
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows in pages of at most ``per_page`` tuples: the ``keys`` values, then the
    ``defaults`` (constants, and ColumnDefaults), bind-processed for ``dialect`` as
    ``columns`` (those of the keys, then of the defaults) say; as given when ``dialect``
    is None."""
    processors = (
        [_column_processor(column, dialect) for column in columns]
        if dialect is not None
        else [None] * (len(keys) + len(defaults))
    )
    whole_row = operator.itemgetter(*keys) if len(keys) > 1 else None
    plain = whole_row is not None and not defaults and not any(processors)
    iterator = iter(rows)
    done = 0
    while chunk := list(itertools.islice(iterator, per_page)):
        try:
            if any(length != len(keys) for length in set(map(len, chunk))):
                raise KeyError(keys)
            if plain and whole_row is not None:
                page = list(map(whole_row, chunk))
            else:
                page = _page(chunk, keys, defaults, processors)
        except (KeyError, TypeError):
            _refuse_row(chunk, keys, done)
            raise  # not a row's keys: a processor's own error
        done += len(chunk)
        yield page


#: Bind processing of one page's values of a column: the values to send.
ColumnProcessor = Callable[[Iterable[Any]], Iterable[Any]]
_BOOLEANS = frozenset({bool, type(None)})


def _column_processor(column: Column[Any], dialect: Dialect) -> ColumnProcessor | None:
    """The bind processing of ``column``'s values for ``dialect``, a page at a time; None
    when its type has no bind processor there. SQLAlchemy's own ``Boolean`` processor is
    a function of True, False and None (it refuses anything else): a page holding only
    those is processed by looking its three results up, at C speed."""
    impl = column.type.dialect_impl(dialect)
    process = impl.bind_processor(dialect)
    if process is None:
        return None
    each = functools.partial(map, process)
    if isinstance(impl, Boolean) and type(impl).bind_processor is Boolean.bind_processor:
        looked_up = functools.partial(map, {v: process(v) for v in (True, False, None)}.get)

        def booleans(values: Iterable[Any]) -> Iterable[Any]:
            page = list(values)
            return looked_up(page) if set(map(type, page)) <= _BOOLEANS else each(page)

        return booleans
    return each


def _page(
    chunk: list[Mapping[str, Any]],
    keys: Sequence[str],
    defaults: Sequence[tuple[Column[Any], Any]],
    processors: Sequence[ColumnProcessor | None],
) -> list[tuple[Any, ...]]:
    """``chunk`` made tuples column by column at C speed (``itemgetter``, ``map``,
    ``zip``): only a column whose type has a bind processor, and a callable default,
    cost a Python call per value. None goes through processors too (JSON null)."""
    if not keys and not defaults:
        return [()] * len(chunk)
    values: list[Iterable[Any]] = [map(operator.itemgetter(key), chunk) for key in keys]
    values += [_default_values(default, len(chunk)) for _, default in defaults]
    processed = (v if p is None else p(v) for v, p in zip(values, processors, strict=True))
    return list(zip(*processed, strict=True))


def _refuse_row(chunk: list[Mapping[str, Any]], keys: Sequence[str], offset: int) -> None:
    """Raise BulkInsertError naming the first row of ``chunk`` that does not name
    ``keys``, if there is one."""
    for index, row in enumerate(chunk, offset):
        try:
            if len(row) != len(keys):
                raise KeyError(sorted(set(row) ^ set(keys)))
            for key in keys:
                row[key]
        except (KeyError, TypeError) as error:
            raise BulkInsertError(
                f"bulk_insert(): row {index} does not name the same columns as the first "
                f"row ({', '.join(keys)}); differing: {error}. Give every row the same keys."
            ) from None


def _default_values(default: Any, count: int) -> Iterable[Any]:
    """``count`` values of a constant (the discriminator) or a ColumnDefault: a callable
    one is called once per row, as insert() calls it."""
    if not hasattr(default, "is_scalar"):
        return itertools.repeat(default, count)
    if default.is_scalar:
        return itertools.repeat(default.arg, count)
    return [default.arg(None) for _ in range(count)]


def _rows_per_page(dialect: Dialect, width: int) -> int:
    """Rows per page: PAGE_ROWS, or fewer when the driver's limit of parameters per
    statement says so (a multi-row VALUES statement carries every value of its page)."""
    return max(1, min(PAGE_ROWS, _parameter_limit(dialect) // max(width, 1)))


def _send(
    connection: Connection,
    table: Table,
    columns: Sequence[Column[Any]],
    pages: Iterator[list[tuple[Any, ...]]],
) -> int:
    dialect = connection.dialect
    quote = dialect.identifier_preparer
    target = f"{quote.format_table(table)} ({', '.join(quote.quote(c.name) for c in columns)})"
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return _copy(connection, f"COPY {target} FROM STDIN", pages)
    placeholder = _PLACEHOLDERS.get(dialect.paramstyle)
    if placeholder is None:  # pragma: no cover (no shipped driver has another paramstyle)
        keys = [c.key for c in columns]
        rows = [dict(zip(keys, row, strict=True)) for page in pages for row in page]
        connection.execute(insert(table), rows)
        return len(rows)
    one = f"({', '.join([placeholder] * len(columns))})"
    head = f"INSERT INTO {target} VALUES "
    per_page = _rows_per_page(dialect, len(columns))
    full_page = head + ", ".join([one] * per_page)
    if dialect.name in ("mysql", "mariadb"):  # the values travel inside the statement
        pages = _pages_by_bytes(pages, _packet(connection), columns)
    count = 0
    for page in pages:
        sql = full_page if len(page) == per_page else head + ", ".join([one] * len(page))
        connection.exec_driver_sql(sql, tuple(itertools.chain.from_iterable(page)))
        count += len(page)
    return count


def _packet(connection: Connection) -> int:
    """The server's max_allowed_packet, asked once per pooled connection."""
    info = connection.connection.info
    packet = info.get(_PACKET_KEY)
    if packet is None:
        packet = info[_PACKET_KEY] = int(
            connection.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one()
        )
    return int(packet)


def _pages_by_bytes(
    pages: Iterable[list[tuple[Any, ...]]], packet: int, columns: Sequence[Column[Any]]
) -> Iterator[list[tuple[Any, ...]]]:
    """The ``pages``, each split until its statement stays under ``packet`` bytes: a
    page found too big is halved until it fits (a row too big alone still goes, and the
    server refuses it, as it would refuse insert())."""
    budget = max(packet - _STATEMENT_SLACK, packet // 2)
    sized = [index for index, column in enumerate(columns) if not _fixed_width(column)]
    per_row = _FIXED_BYTES * (len(columns) - len(sized)) + _QUOTES_BYTES * len(sized)
    for page in pages:
        yield from _fitting(page, budget, sized, per_row)


def _fitting(
    page: list[tuple[Any, ...]], budget: int, sized: Sequence[int], per_row: int
) -> Iterator[list[tuple[Any, ...]]]:
    if len(page) > 1 and _most_bytes(page, sized) + per_row * len(page) > budget:
        half = len(page) // 2
        yield from _fitting(page[:half], budget, sized, per_row)
        yield from _fitting(page[half:], budget, sized, per_row)
    else:
        yield page


#: Most bytes a number, date, time or NULL takes inside a statement; the quotes and
#: ``_binary`` prefix of a text or bytes value.
_FIXED_BYTES = 80
_QUOTES_BYTES = 16
_FIXED_TYPES = (int, float, bool, decimal.Decimal, datetime.date, datetime.time, datetime.timedelta)


def _fixed_width(column: Column[Any]) -> bool:
    try:
        return issubclass(column.type.python_type, _FIXED_TYPES)
    except NotImplementedError:
        return False


def _most_bytes(page: list[tuple[Any, ...]], sized: Sequence[int]) -> int:
    """At least the bytes the text and bytes values of ``page`` (columns ``sized``) take
    inside a statement PyMySQL builds: a character at most 4 (UTF-8, or an ASCII quote
    or backslash doubled), a byte at most 2. At C speed."""
    total = 0
    for index in sized:
        values = map(operator.itemgetter(index), page)
        try:
            total += 4 * sum(map(len, filter(None, values)))
        except TypeError:  # something else than text or bytes in a text column
            total += sum(_FIXED_BYTES + 4 * len(str(row[index])) for row in page)
    return total


def _parameter_limit(dialect: Dialect) -> int:
    """Parameters one statement may carry: SQLite's SQLITE_MAX_VARIABLE_NUMBER (32766
    since 3.32, 999 before); MySQL's prepared-statement limit (PyMySQL inlines them)."""
    if dialect.name == "sqlite":
        return 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
    return 65535


def _copy(connection: Connection, sql: str, pages: Iterable[list[tuple[Any, ...]]]) -> int:
    """Stream ``pages`` through ``COPY``. A row refused while its page is made (a bind
    processor's TypeError) is raised as itself: psycopg < 3.2 would replace it with the
    COPY's own failure."""
    made: list[BaseException] = []

    def watched() -> Iterator[list[tuple[Any, ...]]]:
        try:
            yield from pages
        except BaseException as error:
            made.append(error)
            raise

    try:
        return _stream(connection, sql, watched())
    except BaseException:
        if made:
            raise made[0] from None
        raise


def _stream(connection: Connection, sql: str, pages: Iterable[list[tuple[Any, ...]]]) -> int:
    pooled = connection.connection
    run_async = getattr(pooled.dbapi_connection, "run_async", None)
    if run_async is not None:  # psycopg's AsyncConnection, reached through run_sync

        async def stream(driver: Any) -> int:
            done = 0
            async with driver.cursor() as cursor, cursor.copy(sql) as copy:
                for page in pages:
                    for row in page:
                        await copy.write_row(row)
                    done += len(page)
            return done

        return int(run_async(stream))
    driver: Any = pooled.driver_connection
    count = 0
    with driver.cursor() as cursor, cursor.copy(sql) as copy:
        write_row = copy.write_row
        for page in pages:
            collections.deque(map(write_row, page), maxlen=0)  # the loop at C speed
            count += len(page)
    return count


def _refused(table: Table, error: BaseException, session: Session) -> BulkInsertError:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return bulk_insert_refused(
        f"bulk_insert() into {table.name}: the database refused a row "
        f"({scrub(line, session.get_bind().engine.url)}); none of the rows was kept. "
        "Fix or drop the offending row and insert again.",
        error,
    )
