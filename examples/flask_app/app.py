"""The store API on Flask: each view is one unit of work through ``@unit_of_work()``.

The GET views only read: ``@unit_of_work(readonly=True)`` takes no write lock, so on
SQLite they never queue behind (or hold up) the writers.

The session comes from ``dbsession.integrations.flask``: committed when the view
returns, before Flask sends the response; rolled back when it raises, ``abort()``
and exceptions turned into responses by an error handler included.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from flask import Blueprint, Flask, abort, request
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from dbsession import DbSessionFactory
from dbsession.integrations.flask import unit_of_work

from .. import store_api


class PaymentRequired(HTTPException):
    """402: Werkzeug has no exception of its own for it."""

    code = 402


store = Blueprint("store", __name__)
Reply = tuple[dict[str, Any], int]


def field(name: str) -> Any:
    """A field of the JSON body; 400 if it is missing."""
    body = request.get_json(silent=True) or {}
    if name not in body:
        abort(400, f"missing field {name!r}")
    return body[name]


@store.post("/customers")
@unit_of_work()
def create_customer(session: Session) -> Reply:
    """Add a customer (409 if the email is taken)."""
    return store_api.create_customer(session, field("name"), field("email")), 201


@store.get("/customers/<int:customer_id>")
@unit_of_work(readonly=True)
def get_customer(session: Session, customer_id: int) -> dict[str, Any]:
    """Read one customer (404 if there is none)."""
    try:
        return store_api.get_customer(session, customer_id)
    except store_api.NotFound as error:
        abort(404, str(error))


@store.post("/orders")
@unit_of_work()
def place_order(session: Session) -> Reply:
    """Place an order; over the credit limit it answers 402 and nothing of it is kept."""
    try:
        amount = Decimal(str(field("amount")))
    except InvalidOperation:
        abort(400, "amount is not a number")
    try:
        order = store_api.place_order(session, int(field("customer_id")), field("supplier"), amount)
    except store_api.NotFound as error:
        abort(404, str(error))
    except store_api.OrderDeclined as error:
        raise PaymentRequired(str(error)) from None  # after the writes: rolled back
    return order, 201


@store.get("/orders")
@unit_of_work(readonly=True)
def list_orders(session: Session) -> list[dict[str, Any]]:
    """Every order, oldest first."""
    return store_api.list_orders(session)


def conflict(error: IntegrityError) -> Reply:
    """An IntegrityError (a taken email, say) answers 409; its unit of work was rolled back."""
    return {"detail": "conflict: a unique value is taken"}, 409


def http_error(error: HTTPException) -> Reply:
    """HTTP errors as JSON, like the FastAPI example: ``{"detail": ...}``."""
    return {"detail": error.description}, error.code or 500


def create_app(url: str | URL | None = None) -> Flask:
    """The app on ``url`` (default: DATABASE_URL, else ./dbsession.sqlite3).

    Migrates the database to head and initialises the process default factory first.
    """
    store_api.migrate(url)
    DbSessionFactory.global_init(url)
    app = Flask(__name__)
    app.register_blueprint(store)
    app.register_error_handler(IntegrityError, conflict)
    app.register_error_handler(HTTPException, http_error)
    return app
