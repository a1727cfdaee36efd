"""bulk_insert stores exactly what session.execute(insert(T), rows) stores: bind
expressions of column types, the discriminator of a single-table-inheritance subclass,
SQL-expression and context-sensitive Python defaults, rows too big for one statement on
MariaDB, read-only scopes; and, as a property over generated tables and values, row for
row on every backend."""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from dbsession import DbSessionFactory, ReadOnlyError
from dbsession._bulk import bulk_insert
from dbsession.example.models import Supplier


class Shouted(TypeDecorator[str]):
    """A type whose values go through SQL on the way in (as an encrypting type's do)."""

    impl = String(60)
    cache_ok = True

    def bind_expression(self, bindvalue: Any) -> ColumnElement[str]:
        return func.upper(bindvalue)


def doubled(context: Any) -> int:
    """A context-sensitive default: twice the row's n."""
    return int(context.get_current_parameters()["n"]) * 2


class FidelityBase(DeclarativeBase):
    pass


class Animal(FidelityBase):
    __tablename__ = "fidelity_animal"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(60))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}


class Dog(Animal):
    __mapper_args__ = {"polymorphic_identity": "dog"}


class Person(FidelityBase):
    __tablename__ = "fidelity_person"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(60))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "person"}


class Engineer(Person):  # joined-table inheritance: two tables per row
    __tablename__ = "fidelity_engineer"
    id: Mapped[int] = mapped_column(ForeignKey("fidelity_person.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Special(FidelityBase):
    __tablename__ = "fidelity_special"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    shouted: Mapped[str | None] = mapped_column(Shouted, nullable=True)
    twice: Mapped[int] = mapped_column(Integer, default=doubled)
    stamped: Mapped[datetime.datetime] = mapped_column(DateTime, default=func.now())


class Wide(FidelityBase):
    __tablename__ = "fidelity_wide"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(Text)


@pytest.fixture
def tables(factory: DbSessionFactory) -> Iterator[DbSessionFactory]:
    FidelityBase.metadata.create_all(factory.engine)
    yield factory
    FidelityBase.metadata.drop_all(factory.engine)


def special_rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        query = select(Special.n, Special.shouted, Special.twice, Special.stamped)
        return [tuple(row) for row in conn.execute(query.order_by(Special.n))]


def test_bind_expressions_and_defaults_are_those_insert_applies(
    tables: DbSessionFactory,
) -> None:
    rows = [{"n": n, "shouted": f"quiet {n}"} for n in range(3)]
    with tables.session_scope() as session:
        bulk_insert(session, Special, rows)
    bulk = special_rows(tables.engine)
    with tables.session_scope() as session:
        session.execute(text("DELETE FROM fidelity_special"))
        session.execute(insert(Special), rows)
    reference = special_rows(tables.engine)
    assert [row[:3] for row in bulk] == [row[:3] for row in reference]
    assert [row[:3] for row in bulk] == [(n, f"QUIET {n}", 2 * n) for n in range(3)]
    assert all(row[3] is not None for row in bulk)  # default=func.now()


@pytest.mark.parametrize("value", ["yes", 2])
def test_a_value_booleans_refuse_is_refused_as_insert_refuses_it(
    factory: DbSessionFactory, value: Any
) -> None:
    """Pages of True/False/None skip the Boolean processor (on native booleans); a page
    with anything else still goes through it, so "yes" is refused, not stored as true."""
    flags = Table(
        "bulk_flags", MetaData(), Column("id", Integer, primary_key=True), Column("flag", Boolean)
    )
    flags.create(factory.engine)
    refused = "Not a boolean value|is not None, True, or False"
    try:
        rows = [{"flag": n % 2 == 0} for n in range(1500)] + [{"flag": value}]
        with pytest.raises((TypeError, ValueError), match=refused):
            with factory.session_scope() as session:
                bulk_insert(session, flags, rows)
        with pytest.raises(StatementError, match=refused):
            with factory.session_scope() as session:
                session.execute(insert(flags), rows)
        assert read(factory.engine, flags) == []
    finally:
        flags.drop(factory.engine)


def test_rows_of_one_column_through_insert(tables: DbSessionFactory) -> None:
    """Rows naming one column (a context-sensitive default sends them through insert())."""
    with tables.session_scope() as session:
        assert bulk_insert(session, Special, ({"n": n} for n in range(1, 4))) == 3
    assert [row[:3] for row in special_rows(tables.engine)] == [(n, None, 2 * n) for n in (1, 2, 3)]


def test_a_callable_default_is_called_once_per_row_across_pages(
    factory: DbSessionFactory,
) -> None:
    """2,500 rows (three pages): each row gets its own call of a zero-argument default,
    as insert() gives it, not one value per page."""
    tables = [
        Table(
            name,
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column("name", String(20)),
            Column("serial", Integer, default=itertools.count(1).__next__),
        )
        for name in ("counted_bulk", "counted_ref")
    ]
    rows = [{"name": f"n{i}"} for i in range(2500)]
    for table in tables:
        table.create(factory.engine)
    try:
        with factory.session_scope() as session:
            assert bulk_insert(session, tables[0], rows) == 2500
            session.execute(insert(tables[1]), rows)
        bulk, reference = (read(factory.engine, table) for table in tables)
        assert bulk == reference == [(f"n{i}", i + 1) for i in range(2500)]
    finally:
        for table in tables:
            table.drop(factory.engine)


def test_a_single_table_subclass_gets_its_discriminator(tables: DbSessionFactory) -> None:
    with tables.session_scope() as session:
        bulk_insert(session, Dog, [{"name": "rex"}, {"name": "fido"}])
    with tables.session_scope(readonly=True) as session:
        assert sorted(d.name for d in session.scalars(select(Dog))) == ["fido", "rex"]
        assert set(session.scalars(select(Animal.kind))) == {"dog"}


def test_a_joined_table_subclass_fills_both_tables(tables: DbSessionFactory) -> None:
    rows = [{"id": 1, "name": "ada", "language": "python"}]
    with tables.session_scope() as session:
        assert bulk_insert(session, Engineer, rows) == 1
    with tables.session_scope(readonly=True) as session:
        (engineer,) = session.scalars(select(Engineer))
        assert (engineer.name, engineer.language, engineer.kind) == ("ada", "python", "engineer")


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "joined"])
def test_a_read_only_scope_refuses_bulk_insert_with_read_only_error(
    factory: DbSessionFactory, nested: bool
) -> None:
    if nested:
        with factory.session_scope():
            with pytest.raises(ReadOnlyError):
                with factory.session_scope(readonly=True) as session:
                    bulk_insert(session, Supplier, [{"name": "x"}])
    else:
        with pytest.raises(ReadOnlyError):
            with factory.session_scope(readonly=True) as session:
                bulk_insert(session, Supplier, [{"name": "x"}])
    with factory.engine.connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM supplier")) == 0


@pytest.mark.backends("mysql")
def test_pages_fit_max_allowed_packet(tables: DbSessionFactory) -> None:
    """1,000 rows of 20 KB: more than the server's 16 MB max_allowed_packet in one
    statement. Every row is kept, and so are the unit's earlier writes."""
    with tables.engine.connect() as conn:
        packet = conn.scalar(text("SELECT @@max_allowed_packet"))
    assert packet is not None and 1000 * 20_000 > packet  # else the test proves nothing
    rows = [{"body": f"{n:05d}" + "x" * 19_995} for n in range(1000)]
    with tables.session_scope() as session:
        session.add(Supplier(name="earlier"))
        session.flush()
        assert bulk_insert(session, Wide, rows) == 1000
    with tables.engine.connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM fidelity_wide")) == 1000
        assert conn.scalar(text("SELECT SUM(LENGTH(body)) FROM fidelity_wide")) == 20_000_000
        assert conn.scalar(text("SELECT COUNT(*) FROM supplier")) == 1


# --- the property: bulk_insert and insert() store the same rows -----------------------------

TEXT = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FFF, exclude_categories=["Cs"]),
    max_size=30,
)
KINDS: dict[str, tuple[Any, st.SearchStrategy[Any]]] = {
    "int": (Integer, st.integers(-(2**31), 2**31 - 1)),
    "str": (String(40), TEXT.map(lambda s: s[:40])),
    "text": (Text, TEXT),
    "num": (Numeric(12, 2), st.decimals(-(10**9), 10**9, places=2, allow_nan=False)),
    "bool": (Boolean, st.booleans()),
    "date": (Date, st.dates(datetime.date(1900, 1, 1), datetime.date(2200, 1, 1))),
    "time": (
        DateTime,
        st.datetimes(datetime.datetime(1971, 1, 1), datetime.datetime(2037, 1, 1)).map(
            lambda d: d.replace(microsecond=0)
        ),
    ),
    "blob": (LargeBinary, st.binary(max_size=40)),
    "json": (JSON, st.dictionaries(st.sampled_from("abc"), st.integers(-5, 5), max_size=3)),
    "shout": (Shouted, TEXT.map(lambda s: s[:15])),  # a bind expression
}


@st.composite
def tables_and_rows(
    draw: st.DrawFn,
) -> tuple[list[tuple[str, str, bool, Any]], list[dict[str, Any]]]:
    """Columns (name, kind, given in the rows?, Python default) and rows for them."""
    kinds = draw(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=5))
    columns = []
    for index, kind in enumerate(kinds):
        default = draw(st.none() | KINDS[kind][1]) if kind not in ("json",) else None
        given = default is None or draw(st.booleans())
        columns.append((f"c{index}", kind, given, default))
    value_of = {name: st.none() | KINDS[kind][1] for name, kind, given, _ in columns if given}
    rows = draw(st.lists(st.fixed_dictionaries(value_of), min_size=1, max_size=12))
    return columns, rows


_numbers = itertools.count()


def make_table(name: str, columns: list[tuple[str, str, bool, Any]]) -> Table:
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        *(Column(c, KINDS[kind][0], default=default) for c, kind, _, default in columns),
    )


def read(engine: Engine, table: Table) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row)[1:] for row in conn.execute(select(table).order_by(table.c.id))]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=tables_and_rows())
def test_bulk_insert_stores_what_insert_stores(
    factory: DbSessionFactory, case: tuple[list[tuple[str, str, bool, Any]], list[dict[str, Any]]]
) -> None:
    columns, rows = case
    number = next(_numbers)
    bulk, reference = (
        make_table(f"prop_bulk_{number}", columns),
        make_table(f"prop_ref_{number}", columns),
    )
    for table in (bulk, reference):
        table.create(factory.engine)
    try:
        with factory.session_scope() as session:
            assert bulk_insert(session, bulk, rows) == len(rows)
            session.execute(insert(reference), rows)
        assert read(factory.engine, bulk) == read(factory.engine, reference)
    finally:
        for table in (bulk, reference):
            table.drop(factory.engine)


def test_decimal_and_json_values_survive_as_insert_stores_them(factory: DbSessionFactory) -> None:
    """A fixed example of the property, so a failure has a readable repro."""
    columns = [("c0", "num", True, None), ("c1", "json", True, None), ("c2", "int", False, 7)]
    rows: list[dict[str, Any]] = [{"c0": Decimal("1.50"), "c1": {"a": 1}}, {"c0": None, "c1": None}]
    bulk, reference = make_table("fixed_bulk", columns), make_table("fixed_ref", columns)
    for table in (bulk, reference):
        table.create(factory.engine)
    try:
        with factory.session_scope() as session:
            bulk_insert(session, bulk, rows)
            session.execute(insert(reference), rows)
        assert read(factory.engine, bulk) == read(factory.engine, reference)
    finally:
        for table in (bulk, reference):
            table.drop(factory.engine)
