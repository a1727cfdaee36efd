"""The store API on FastAPI: ``async def`` path operations with the ``AsyncDbSession`` dependency.

The same API as ``examples.fastapi_app.app``; each request is one async unit of work
(``dbsession.asyncio``), committed when the path operation returns, before the
response is sent, and rolled back when it raises, HTTPException included. Needs
``pip install 'sqlalchemy-dbsession[fastapi,async]'``.

The units of work are the sync ones of ``examples.store_api``, run on the request's
AsyncSession with ``AsyncSession.run_sync`` (SQLAlchemy runs them in a greenlet over
the async driver, so they do not block the event loop). ``GET /customers/{id}`` shows
the plain ``await session.get(...)`` style.

The GET path operations only read: their ``ReadOnlyDbSession`` / ``AsyncReadOnlyDbSession``
takes no write lock, so on SQLite they never queue behind (or hold up) the writers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError

from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.example.models import Customer
from dbsession.integrations.fastapi import AsyncDbSession, AsyncReadOnlyDbSession

from .. import store_api
from .app import NewCustomer, NewOrder, conflict

router = APIRouter()


@router.post("/customers", status_code=201)
async def create_customer(body: NewCustomer, session: AsyncDbSession) -> dict[str, Any]:
    """Add a customer (409 if the email is taken)."""
    return await session.run_sync(store_api.create_customer, body.name, body.email)


@router.get("/customers/{customer_id}")
async def get_customer(customer_id: int, session: AsyncReadOnlyDbSession) -> dict[str, Any]:
    """Read one customer (404 if there is none)."""
    customer = await session.get(Customer, customer_id)
    if customer is None:
        raise HTTPException(404, f"no customer {customer_id}")
    return store_api.customer_json(customer)


@router.post("/orders", status_code=201)
async def place_order(body: NewOrder, session: AsyncDbSession) -> dict[str, Any]:
    """Place an order; over the credit limit it answers 402 and nothing of it is kept."""
    try:
        return await session.run_sync(
            store_api.place_order, body.customer_id, body.supplier, body.amount
        )
    except store_api.NotFound as error:
        raise HTTPException(404, str(error)) from None
    except store_api.OrderDeclined as error:
        # Raised after the supplier and the order were written: the dependency rolls back.
        raise HTTPException(402, str(error)) from None


@router.get("/orders")
async def list_orders(session: AsyncReadOnlyDbSession) -> list[dict[str, Any]]:
    """Every order, oldest first."""
    return await session.run_sync(store_api.list_orders)


def create_app(url: str | URL | None = None) -> FastAPI:
    """The async app on ``url`` (default: DATABASE_URL, else ./dbsession.sqlite3).

    Name no driver in ``url`` (``postgresql://``, ``mysql://``, ``sqlite:///...``):
    the migrations use the sync driver, the app the async one. At start-up it migrates
    the database to head and initialises the process default async factory; at
    shutdown it disposes of the engine.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store_api.migrate, url)
        AsyncDbSessionFactory.global_init(url)
        yield
        await AsyncDbSessionFactory.global_dispose()

    app = FastAPI(title="dbsession store (FastAPI, async)", lifespan=lifespan)
    app.include_router(router)
    app.add_exception_handler(IntegrityError, conflict)
    return app


app = create_app()
