"""The store API on FastAPI: each request is one unit of work through the ``DbSession`` dependency.

Sync path operations (FastAPI runs them in its thread pool); the session comes from
``dbsession.integrations.fastapi``: committed when the path operation returns, before
the response is sent; rolled back when it raises, HTTPException included.

The GET path operations only read: their ``ReadOnlyDbSession`` / ``AsyncReadOnlyDbSession``
takes no write lock, so on SQLite they never queue behind (or hold up) the writers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError

from dbsession import DbSessionFactory
from dbsession.integrations.fastapi import DbSession, ReadOnlyDbSession

from .. import store_api


class NewCustomer(BaseModel):
    """Body of POST /customers."""

    name: str
    email: str


class NewOrder(BaseModel):
    """Body of POST /orders."""

    customer_id: int
    supplier: str
    amount: Decimal


router = APIRouter()


@router.post("/customers", status_code=201)
def create_customer(body: NewCustomer, session: DbSession) -> dict[str, Any]:
    """Add a customer (409 if the email is taken)."""
    return store_api.create_customer(session, body.name, body.email)


@router.get("/customers/{customer_id}")
def get_customer(customer_id: int, session: ReadOnlyDbSession) -> dict[str, Any]:
    """Read one customer (404 if there is none)."""
    try:
        return store_api.get_customer(session, customer_id)
    except store_api.NotFound as error:
        raise HTTPException(404, str(error)) from None


@router.post("/orders", status_code=201)
def place_order(body: NewOrder, session: DbSession) -> dict[str, Any]:
    """Place an order; over the credit limit it answers 402 and nothing of it is kept."""
    try:
        return store_api.place_order(session, body.customer_id, body.supplier, body.amount)
    except store_api.NotFound as error:
        raise HTTPException(404, str(error)) from None
    except store_api.OrderDeclined as error:
        # Raised after the supplier and the order were written: the dependency rolls back.
        raise HTTPException(402, str(error)) from None


@router.get("/orders")
def list_orders(session: ReadOnlyDbSession) -> list[dict[str, Any]]:
    """Every order, oldest first."""
    return store_api.list_orders(session)


async def conflict(request: Request, error: Exception) -> JSONResponse:
    """An IntegrityError (a taken email, say) answers 409; its unit of work was rolled back."""
    return JSONResponse({"detail": "conflict: a unique value is taken"}, status_code=409)


def create_app(url: str | URL | None = None) -> FastAPI:
    """The app on ``url`` (default: DATABASE_URL, else ./dbsession.sqlite3).

    At start-up it migrates the database to head and initialises the process default
    factory; at shutdown it disposes of the engine.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store_api.migrate, url)
        DbSessionFactory.global_init(url)
        yield
        DbSessionFactory.global_dispose()

    app = FastAPI(title="dbsession store (FastAPI, sync)", lifespan=lifespan)
    app.include_router(router)
    app.add_exception_handler(IntegrityError, conflict)
    return app


app = create_app()
