"""The store API's units of work, shared by the web examples; no web framework here.

Each function takes the request's session and only adds, changes and flushes;
committing or rolling back is the request's business (one request, one unit of work).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, joinedload

from dbsession import migrations
from dbsession.example.models import Customer, Order, Supplier
from dbsession.example.store import MIGRATIONS

#: Orders above this amount are declined, after the order was written (to show the rollback).
CREDIT_LIMIT = Decimal("1000.00")


class NotFound(LookupError):
    """No customer with the requested id (the apps answer 404)."""


class OrderDeclined(Exception):
    """The order is over the credit limit (the apps answer 402, after the writes)."""


def migrate(url: str | URL | None = None) -> None:
    """Bring the database (default: DATABASE_URL, else ./dbsession.sqlite3) to the head of
    the store example's own revisions (shipped in the package)."""
    migrations.upgrade(url=url, migrations=MIGRATIONS)


def customer_json(customer: Customer) -> dict[str, Any]:
    """A customer as the API returns it."""
    return {"id": customer.id, "name": customer.name, "email": customer.email}


def order_json(order: Order) -> dict[str, Any]:
    """An order as the API returns it (the amount as a string, to keep its cents exact)."""
    return {
        "id": order.id,
        "customer": order.customer.email,
        "supplier": order.supplier.name,
        "amount": str(order.amount),
    }


def create_customer(session: Session, name: str, email: str) -> dict[str, Any]:
    """Add a customer; a taken email raises IntegrityError (the apps answer 409)."""
    customer = Customer(name=name, email=email)
    session.add(customer)
    session.flush()
    return customer_json(customer)


def get_customer(session: Session, customer_id: int) -> dict[str, Any]:
    """Read one customer; raises NotFound."""
    customer = session.get(Customer, customer_id)
    if customer is None:
        raise NotFound(f"no customer {customer_id}")
    return customer_json(customer)


def place_order(
    session: Session, customer_id: int, supplier_name: str, amount: Decimal
) -> dict[str, Any]:
    """Write an order of a customer from a supplier (created on its first order).

    Raises NotFound before any write, and OrderDeclined after the supplier and the
    order were written: the request must roll both back.
    """
    customer = session.get(Customer, customer_id)
    if customer is None:
        raise NotFound(f"no customer {customer_id}")
    supplier = session.scalar(select(Supplier).where(Supplier.name == supplier_name))
    if supplier is None:
        supplier = Supplier(name=supplier_name)
    order = Order(customer=customer, supplier=supplier, amount=amount)
    session.add(order)
    session.flush()
    if amount > CREDIT_LIMIT:
        raise OrderDeclined(f"order #{order.id} of {amount} is over the limit of {CREDIT_LIMIT}")
    return order_json(order)


def list_orders(session: Session) -> list[dict[str, Any]]:
    """Every order, oldest first."""
    query = (
        select(Order)
        .options(joinedload(Order.customer), joinedload(Order.supplier))
        .order_by(Order.id)
    )
    return [order_json(order) for order in session.scalars(query)]
