"""session_scope(): all or nothing, on every backend."""

from __future__ import annotations

from collections.abc import Generator
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import DetachedInstanceError

from dbsession import DbSessionFactory
from dbsession.example.models import Customer, Order, Supplier


class Boom(Exception):
    pass


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text(f"SELECT COUNT(*) FROM {table}")) or 0)


def names(engine: Engine, table: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text(f"SELECT name FROM {table}")))


@pytest.fixture
def seeded(factory: DbSessionFactory) -> tuple[int, int, int]:
    """One customer, one supplier and one order already committed: (customer, supplier, order)."""
    with factory.session_scope() as session:
        customer = Customer(name="Old Customer", email="old@example.com")
        supplier = Supplier(name="Old Supplier")
        order = Order(customer=customer, supplier=supplier, amount=Decimal("9.99"))
        session.add(order)
        session.flush()
        return customer.id, supplier.id, order.id


def unit_of_work(session: Session, ids: tuple[int, int, int]) -> None:
    """The seed's unit of work: inserts, updates and deletes across three tables."""
    customer_id, supplier_id, order_id = ids
    new_customer = Customer(name="Ada", email="ada@example.com")
    new_supplier = Supplier(name="ACME")
    session.add_all([new_customer, new_supplier])
    session.add(Order(customer=new_customer, supplier=new_supplier, amount=Decimal("12.50")))
    old_customer = session.get_one(Customer, customer_id)
    old_customer.name = "Renamed Customer"
    session.get_one(Supplier, supplier_id).name = "Renamed Supplier"
    session.delete(session.get_one(Order, order_id))


def test_unit_of_work_commits_inserts_updates_and_deletes_together(
    factory: DbSessionFactory, seeded: tuple[int, int, int], other_connection: Engine
) -> None:
    with factory.session_scope() as session:
        unit_of_work(session, seeded)

    assert names(other_connection, "customer") == {"Renamed Customer", "Ada"}
    assert names(other_connection, "supplier") == {"Renamed Supplier", "ACME"}
    with other_connection.connect() as conn:
        amounts = list(conn.scalars(text("SELECT amount FROM orders")))
    assert amounts == [Decimal("12.50")]


def test_exception_at_the_end_of_the_unit_of_work_leaves_no_trace(
    factory: DbSessionFactory, seeded: tuple[int, int, int], other_connection: Engine
) -> None:
    with pytest.raises(Boom):
        with factory.session_scope() as session:
            unit_of_work(session, seeded)
            session.flush()
            raise Boom

    assert names(other_connection, "customer") == {"Old Customer"}
    assert names(other_connection, "supplier") == {"Old Supplier"}
    assert count(other_connection, "orders") == 1


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, GeneratorExit, Boom])
def test_any_base_exception_rolls_back_and_is_reraised_unchanged(
    factory: DbSessionFactory, other_connection: Engine, error: type[BaseException]
) -> None:
    raised = error("stop")
    with pytest.raises(error) as caught:
        with factory.session_scope() as session:
            session.add(Supplier(name="never"))
            session.flush()
            raise raised
    assert caught.value is raised
    assert count(other_connection, "supplier") == 0
    assert factory.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_failing_commit_rolls_back_and_raises(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with factory.session_scope() as session:
        session.add(Supplier(name="dup"))

    with pytest.raises(IntegrityError):
        with factory.session_scope() as session:
            session.add(Supplier(name="fine"))
            session.add(Customer(name="c", email="c@example.com"))
            session.flush()
            session.add(Supplier(name="dup"))  # flushed, and rejected, by commit

    assert names(other_connection, "supplier") == {"dup"}
    assert count(other_connection, "customer") == 0
    assert factory.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_session_is_closed_after_the_scope(factory: DbSessionFactory) -> None:
    with factory.session_scope() as session:
        session.add(Supplier(name="s"))
        assert session.in_transaction()
    assert not session.in_transaction()
    assert list(session.identity_map.values()) == []
    assert factory.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_objects_stay_readable_after_the_scope(factory: DbSessionFactory) -> None:
    with factory.session_scope() as session:
        supplier = Supplier(name="readable")
        session.add(supplier)
    assert supplier.name == "readable"
    assert supplier.id is not None


def test_expire_on_commit_can_be_turned_back_on(backend_url: object) -> None:
    expiring = DbSessionFactory(backend_url, expire_on_commit=True)  # type: ignore[arg-type]
    try:
        Supplier.metadata.create_all(expiring.engine)
        with expiring.session_scope() as session:
            supplier = Supplier(name="expired")
            session.add(supplier)
        with pytest.raises(DetachedInstanceError):
            _ = supplier.name
    finally:
        Supplier.metadata.drop_all(expiring.engine)
        expiring.dispose()


def test_each_scope_gets_a_fresh_session(factory: DbSessionFactory) -> None:
    with factory.session_scope() as first:
        pass
    with factory.session_scope() as second:
        assert first is not second
    with factory.session_scope() as outer, factory.session_scope(independent=True) as inner:
        assert outer is not inner


def test_foreign_keys_are_enforced(factory: DbSessionFactory) -> None:
    with pytest.raises(IntegrityError):
        with factory.session_scope() as session:
            session.add(Order(customer_id=12345, supplier_id=54321, amount=Decimal(1)))


def test_create_session_is_managed_by_the_caller(factory: DbSessionFactory) -> None:
    session = factory.create_session()
    try:
        session.add(Supplier(name="manual"))
        session.commit()
        assert session.scalar(select(func.count()).select_from(Supplier)) == 1
    finally:
        session.close()


def _generator_using_a_scope(factory: DbSessionFactory) -> Generator[int, None, None]:
    with factory.session_scope() as session:
        session.add(Supplier(name="from generator"))
        session.flush()
        yield 1
        yield 2


def test_abandoned_generator_rolls_back_its_scope(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    gen = _generator_using_a_scope(factory)
    assert next(gen) == 1
    gen.close()  # GeneratorExit inside the scope
    assert count(other_connection, "supplier") == 0
    assert factory.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
