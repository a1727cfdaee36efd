"""bulk_insert: many rows in the scope's transaction, read back as executemany stores them."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from helpers import ITEM, REFERENCE, awkward_rows, metadata, stored
from sqlalchemy import (
    func,
    insert,
    select,
)
from sqlalchemy.engine import Engine

from dbsession import DbSessionFactory
from dbsession._bulk import bulk_insert
from dbsession._errors import BulkInsertError
from dbsession.example.models import Supplier


@pytest.fixture
def items(factory: DbSessionFactory) -> Iterator[Engine]:
    metadata.create_all(factory.engine)
    yield factory.engine
    metadata.drop_all(factory.engine)


def test_rows_read_back_as_executemany_stores_them(
    factory: DbSessionFactory, items: Engine
) -> None:
    rows = awkward_rows(60)
    with factory.session_scope() as session:
        assert bulk_insert(session, ITEM, rows) == 60
        session.execute(insert(REFERENCE), rows)
    got = stored(items, ITEM)
    assert got == stored(items, REFERENCE)
    with items.connect() as conn:  # NULL where executemany stores NULL (JSON: JSON null)
        nulls = [
            conn.scalar(select(func.count()).select_from(t).where(t.c.doc.is_(None)))
            for t in (ITEM, REFERENCE)
        ]
    assert nulls[0] == nulls[1]
    expected = [(*row.values(), "plain") for row in rows]
    assert [(*row[:3], row[3], *row[4:]) for row in got] == expected


def test_many_pages_commit_with_the_scope(factory: DbSessionFactory, items: Engine) -> None:
    rows = [{"name": f"n{i}", "amount": Decimal(i)} for i in range(2500)]
    with factory.session_scope() as session:
        assert bulk_insert(session, ITEM, rows) == 2500
        assert session.scalar(select(func.count()).select_from(ITEM)) == 2500
    with items.connect() as conn:
        assert conn.scalar(select(func.sum(ITEM.c.amount))) == sum(range(2500))


def test_rows_roll_back_with_the_scope(factory: DbSessionFactory, items: Engine) -> None:
    with pytest.raises(RuntimeError):
        with factory.session_scope() as session:
            bulk_insert(session, ITEM, awkward_rows(1200))
            raise RuntimeError("the unit of work failed later")
    assert stored(items, ITEM) == []


def test_a_refused_row_is_a_bulk_insert_error_and_keeps_nothing(
    factory: DbSessionFactory, items: Engine
) -> None:
    rows = awkward_rows(1500)
    rows[1400]["name"] = None  # NOT NULL, in the second page
    with factory.session_scope() as session:
        session.execute(insert(ITEM), [{"name": "before"}])
        with pytest.raises(BulkInsertError, match="bulk_item: the database refused a row") as e:
            bulk_insert(session, ITEM, rows)
        assert e.value.__cause__ is not None
        bulk_insert(session, ITEM, [{"name": "after"}])  # the scope goes on
    assert [row[0] for row in stored(items, ITEM)] == ["before", "after"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"name": "x", "colour": "red"}, "no column 'colour'"),
        ({"note": "no name"}, "row 1500 does not name the same columns"),
        ({"name": "x", "note": "y", "day": None}, "row 1500 does not name the same columns"),
        (("x", "y"), "row 1500 does not name the same columns"),
    ],
)
def test_rows_with_other_columns_are_refused_before_anything_is_kept(
    factory: DbSessionFactory, items: Engine, bad: Any, message: str
) -> None:
    rows = [{"name": "a", "note": "b"}] * 1500 + [bad]
    if "colour" in bad:
        rows = [bad, *rows]
    with pytest.raises(BulkInsertError, match=message):
        with factory.session_scope() as session:
            bulk_insert(session, ITEM, rows)
    assert stored(items, ITEM) == []


def test_a_mapped_class_and_server_defaults(factory: DbSessionFactory) -> None:
    with factory.session_scope() as session:
        assert bulk_insert(session, Supplier, ({"name": f"s{i}"} for i in range(3))) == 3
        assert bulk_insert(session, Supplier, []) == 0
    with factory.session_scope(readonly=True) as session:
        found = session.execute(select(Supplier.name, Supplier.created_at).order_by("name"))
        rows = found.all()
    assert [name for name, _ in rows] == ["s0", "s1", "s2"]
    assert all(created is not None for _, created in rows)


def test_something_else_than_a_table_is_refused(factory: DbSessionFactory) -> None:
    with factory.session_scope() as session:
        with pytest.raises(BulkInsertError, match="needs a Table or a mapped class"):
            bulk_insert(session, dict, [{"name": "x"}])
