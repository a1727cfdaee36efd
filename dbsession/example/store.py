"""The store example's units of work, and the report the main job prints."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, mask_url, migrations
from dbsession._config import ENV_VAR

from .models import Customer, Order, Supplier


class PaymentDeclined(Exception):
    """Raised halfway through the second unit of work, to show the rollback."""


def counts(session: Session) -> dict[str, int]:
    """Rows per example table."""
    return {
        model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
        for model in (Customer, Supplier, Order)
    }


def place_orders(session: Session, run: int) -> list[str]:
    """The seed's unit of work: create, update and delete across three tables."""
    ada = Customer(name="Ada Lovelace", email=f"ada.{run}@example.com")
    grace = Customer(name="Grace Hopper", email=f"grace.{run}@example.com")
    acme = Supplier(name=f"ACME #{run}")
    globex = Supplier(name=f"Globex #{run}")
    orders = [
        Order(customer=ada, supplier=acme, amount=Decimal("120.00")),
        Order(customer=ada, supplier=globex, amount=Decimal("35.50")),
        Order(customer=grace, supplier=acme, amount=Decimal("9.99")),
    ]
    session.add_all(orders)
    session.flush()
    grace.name = "Rear Admiral Grace Hopper"
    session.delete(orders[1])
    return [
        "created customers Ada Lovelace, Grace Hopper",
        f"created suppliers {acme.name}, {globex.name}",
        "placed 3 orders (120.00, 35.50, 9.99)",
        "renamed Grace Hopper to Rear Admiral Grace Hopper",
        f"deleted order #{orders[1].id} (35.50)",
    ]


def failing_order(session: Session, run: int) -> None:
    """A second unit of work that writes, then fails before it can commit."""
    customer = Customer(name="Charles Babbage", email=f"charles.{run}@example.com")
    supplier = session.scalars(select(Supplier).order_by(Supplier.id)).first()
    if supplier is None:
        supplier = Supplier(name=f"Initech #{run}")
    supplier.name = f"{supplier.name} (renamed)"
    session.add(Order(customer=customer, supplier=supplier, amount=Decimal("999.00")))
    session.flush()
    raise PaymentDeclined("payment of 999.00 declined")


def run(factory: DbSessionFactory) -> str:
    """Run both units of work on ``factory`` and return the report."""
    with factory.session_scope() as session:
        before = counts(session)
    run_number = before["customer"] // 2 + 1
    lines = [f"dbsession example: {mask_url(factory.url)}", "", "unit of work 1: committed"]
    with factory.session_scope() as session:
        lines += [f"  - {step}" for step in place_orders(session, run_number)]
    with factory.session_scope() as session:
        middle = counts(session)
    lines += ["", "unit of work 2: rolled back"]
    try:
        with factory.session_scope() as session:
            failing_order(session, run_number)
    except PaymentDeclined as error:
        lines.append(f"  - added Charles Babbage, renamed a supplier, placed an order; {error}")
    with factory.session_scope() as session:
        after = counts(session)
    kept = "nothing of it was kept" if after == middle else "SOMETHING WAS KEPT"
    lines.append(f"  - {kept}")
    lines += ["", "rows now: " + ", ".join(f"{table} {n}" for table, n in after.items())]
    return "\n".join(lines)


#: The example's own Alembic revisions, shipped inside the package: the main job runs
#: these, never the migrations of the folder it is started from.
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


#: The example's own database when DATABASE_URL is not set: never the embedded default
#: ``./dbsession.sqlite3``, which may be the database of the app whose folder it runs in.
DATABASE = "dbsession-example.sqlite3"


def main() -> int:
    """Entry point of ``python -m dbsession.example``: migrate to head, then run the store
    (on DATABASE_URL, else on ``./dbsession-example.sqlite3``)."""
    url = None if os.environ.get(ENV_VAR) else f"sqlite:///{DATABASE}"
    factory = DbSessionFactory.global_init(url)
    migrations.upgrade(url=factory.url, migrations=MIGRATIONS)
    print(run(factory))
    print(f"schema: Alembic revision {migrations.current(url=factory.url)} (head)")
    return 0
