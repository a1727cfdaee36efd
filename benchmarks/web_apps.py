"""The app that benchmarks/web_overload.py drives: users and items, written four ways.

A small equivalent of the backend of ``fastapi/full-stack-fastapi-template`` (not a copy):
items owned by users, with list, get, create, PUT update and delete; the current user is
a sync dependency that reads the user through the request's session, as the template's
``CurrentUser`` does (the user id comes in an ``X-User`` header instead of a JWT).

- ``fastapi_bare``: the template's way, ``with Session(engine) as session: yield session``
  in a sync generator dependency (FastAPI's default scope), sync ``def`` path operations
  that call ``session.commit()`` and ``session.refresh()`` themselves.
- ``fastapi_dbsession``: the same path operations on ``session: DbSession``; they flush,
  and the dependency commits before the response is sent.
- ``flask_bare``: a session per request made on first use, closed in ``teardown_appcontext``;
  the views commit themselves.
- ``flask_dbsession``: the views under ``@unit_of_work``.

Configured from the environment (set by web_overload.py): ``WEB_BENCH_URL``,
``WEB_BENCH_POOL_SIZE``, ``WEB_BENCH_MAX_OVERFLOW``, ``WEB_BENCH_POOL_TIMEOUT``,
``WEB_BENCH_THREADS`` (FastAPI: anyio's thread limit per worker, 40 by default), and
``WEB_BENCH_STATS``: a folder where each process writes, when it stops, how many
connections it checked out and for how long in all (``<pid>.json``).

Run: ``python -m uvicorn --factory --app-dir benchmarks web_apps:fastapi_bare``, or
``python benchmarks/web_apps.py flask_bare PORT`` (Werkzeug's threaded server).
No ``from __future__ import annotations``: FastAPI reads the annotations.
"""

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from flask import Flask, abort, g
from flask import request as flask_request
from sqlalchemy import ForeignKey, String, create_engine, event, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dbsession import DbSessionFactory
from dbsession.integrations.fastapi import DbSession
from dbsession.integrations.flask import unit_of_work


class Base(DeclarativeBase):
    """The benchmark's tables (prefixed ``web_``)."""


class User(Base):
    """A user; items belong to one."""

    __tablename__ = "web_user"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    full_name: Mapped[str] = mapped_column(String(255))


class Item(Base):
    """An item of a user."""

    __tablename__ = "web_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(String(255))
    owner_id: Mapped[int] = mapped_column(ForeignKey("web_user.id"), index=True)


def pool_options() -> dict[str, Any]:
    """The pool settings both variants use, from the environment."""
    return {
        "pool_size": int(os.environ.get("WEB_BENCH_POOL_SIZE", "10")),
        "max_overflow": int(os.environ.get("WEB_BENCH_MAX_OVERFLOW", "5")),
        "pool_timeout": float(os.environ.get("WEB_BENCH_POOL_TIMEOUT", "3")),
    }


# --- What a request does, shared by the four apps ----------------------------------------


class NotFound(Exception):
    """No such user or item (404)."""


def public(item: Item) -> dict[str, Any]:
    """The item as the API returns it."""
    return {
        "id": item.id,
        "title": item.title,
        "description": item.description,
        "owner_id": item.owner_id,
    }


def user_of(session: Session, user_id: int) -> User:
    """The current user (the template reads it in a dependency, through the session)."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound
    return user


def item_of(session: Session, user: User, item_id: int) -> Item:
    """The user's item ``item_id``."""
    item = session.get(Item, item_id)
    if item is None or item.owner_id != user.id:
        raise NotFound
    return item


def list_items(session: Session, user: User, skip: int, limit: int) -> dict[str, Any]:
    """A page of the user's items and how many there are."""
    mine = Item.owner_id == user.id
    count = session.scalar(select(func.count()).select_from(Item).where(mine))
    items = session.scalars(select(Item).where(mine).order_by(Item.id).offset(skip).limit(limit))
    return {"data": [public(item) for item in items], "count": count}


def new_item(session: Session, user: User, body: dict[str, Any]) -> Item:
    """Add a new item of the user."""
    item = Item(title=body["title"], description=body.get("description"), owner_id=user.id)
    session.add(item)
    return item


def update(item: Item, body: dict[str, Any]) -> None:
    """Set the fields the body has."""
    for field in ("title", "description"):
        if field in body:
            setattr(item, field, body[field])


def save(session: Session, item: Item | None = None) -> None:
    """The template's ending: commit, then reload the item (a new transaction)."""
    session.commit()
    if item is not None:
        session.refresh(item)


# --- Connection hold times (WEB_BENCH_STATS) ---------------------------------------------

_held: dict[str, float] = {"checkouts": 0, "held": 0.0, "longest": 0.0}
_out: dict[int, float] = {}
_lock = threading.Lock()


def watch(engine: Engine) -> None:
    """Count ``engine``'s checkouts and how long each connection stays out."""

    def checkout(dbapi: object, record: object, proxy: object) -> None:
        _out[id(record)] = time.perf_counter()

    def checkin(dbapi: object, record: object) -> None:
        start = _out.pop(id(record), None)
        if start is not None:
            held = time.perf_counter() - start
            with _lock:
                _held["checkouts"] += 1
                _held["held"] += held
                _held["longest"] = max(_held["longest"], held)

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)


def write_stats() -> None:
    """Write this process's hold times to ``$WEB_BENCH_STATS/<pid>.json``."""
    folder = os.environ.get("WEB_BENCH_STATS")
    if folder:
        Path(folder, f"{os.getpid()}.json").write_text(json.dumps(_held))


# --- FastAPI -------------------------------------------------------------------------------

_engine: list[Engine] = []


def get_db() -> Iterator[Session]:
    """The template's dependency."""
    with Session(_engine[0]) as session:
        yield session


BareSession = Annotated[Session, Depends(get_db)]


def bare_user(session: BareSession, x_user: Annotated[int, Header()]) -> User:
    """The current user, through the request's session."""
    return user_of(session, x_user)


def dbsession_user(session: DbSession, x_user: Annotated[int, Header()]) -> User:
    """The current user, through the request's unit of work."""
    return user_of(session, x_user)


BareUser = Annotated[User, Depends(bare_user)]
DbUser = Annotated[User, Depends(dbsession_user)]


def _fastapi(lifespan: Callable[[FastAPI], Any]) -> FastAPI:
    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: NotFound) -> JSONResponse:
        return JSONResponse({"detail": "not found"}, status_code=404)

    @app.exception_handler(sa_exc.SQLAlchemyError)
    async def database_error(request: Request, error: sa_exc.SQLAlchemyError) -> JSONResponse:
        return JSONResponse(*error_response(error))

    return app


def error_response(error: Exception) -> tuple[dict[str, str], int]:
    """503 naming a pool timeout, else 500 naming the error's class."""
    if isinstance(error, sa_exc.TimeoutError):
        return {"cause": "pool timeout"}, 503
    return {"cause": type(error).__name__}, 500


def set_threads() -> None:
    """``WEB_BENCH_THREADS``: the size of anyio's default thread limiter (40 when unset)."""
    threads = os.environ.get("WEB_BENCH_THREADS")
    if threads:
        anyio.to_thread.current_default_thread_limiter().total_tokens = int(threads)


def fastapi_bare() -> FastAPI:
    """The template's way: a Session per request from a sync generator dependency."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_threads()
        engine = create_engine(os.environ["WEB_BENCH_URL"], **pool_options())
        watch(engine)
        _engine.append(engine)
        yield
        engine.dispose()
        write_stats()

    app = _fastapi(lifespan)

    @app.get("/items/")
    def read_items(session: BareSession, user: BareUser, skip: int = 0, limit: int = 20) -> Any:
        return list_items(session, user, skip, limit)

    @app.get("/items/{item_id}")
    def read_item(session: BareSession, user: BareUser, item_id: int) -> Any:
        return public(item_of(session, user, item_id))

    @app.post("/items/")
    def create_item(session: BareSession, user: BareUser, body: dict[str, Any]) -> Any:
        item = new_item(session, user, body)
        save(session, item)
        return public(item)

    @app.put("/items/{item_id}")
    def update_item(
        session: BareSession, user: BareUser, item_id: int, body: dict[str, Any]
    ) -> Any:
        item = item_of(session, user, item_id)
        update(item, body)
        session.add(item)
        save(session, item)
        return public(item)

    @app.delete("/items/{item_id}")
    def delete_item(session: BareSession, user: BareUser, item_id: int) -> Any:
        session.delete(item_of(session, user, item_id))
        save(session)
        return {"message": "Item deleted successfully"}

    return app


def fastapi_dbsession() -> FastAPI:
    """The same path operations on dbsession's ``DbSession`` dependency."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_threads()
        factory = DbSessionFactory.global_init(os.environ["WEB_BENCH_URL"], **pool_options())
        watch(factory.engine)
        yield
        DbSessionFactory.global_dispose()
        write_stats()

    app = _fastapi(lifespan)

    @app.get("/items/")
    def read_items(session: DbSession, user: DbUser, skip: int = 0, limit: int = 20) -> Any:
        return list_items(session, user, skip, limit)

    @app.get("/items/{item_id}")
    def read_item(session: DbSession, user: DbUser, item_id: int) -> Any:
        return public(item_of(session, user, item_id))

    @app.post("/items/")
    def create_item(session: DbSession, user: DbUser, body: dict[str, Any]) -> Any:
        item = new_item(session, user, body)
        session.flush()  # the id; the dependency commits before the response is sent
        return public(item)

    @app.put("/items/{item_id}")
    def update_item(session: DbSession, user: DbUser, item_id: int, body: dict[str, Any]) -> Any:
        item = item_of(session, user, item_id)
        update(item, body)
        session.flush()
        return public(item)

    @app.delete("/items/{item_id}")
    def delete_item(session: DbSession, user: DbUser, item_id: int) -> Any:
        session.delete(item_of(session, user, item_id))
        return {"message": "Item deleted successfully"}

    return app


# --- Flask ---------------------------------------------------------------------------------


def _flask() -> Flask:
    app = Flask(__name__)

    @app.errorhandler(NotFound)
    def not_found(error: NotFound) -> tuple[dict[str, str], int]:
        return {"detail": "not found"}, 404

    @app.errorhandler(sa_exc.SQLAlchemyError)
    def database_error(error: sa_exc.SQLAlchemyError) -> tuple[dict[str, str], int]:
        return error_response(error)

    return app


def _user_id() -> int:
    value = flask_request.headers.get("X-User")
    if value is None:
        abort(422)
    return int(value)


def _body() -> dict[str, Any]:
    body: dict[str, Any] = flask_request.get_json()
    return body


def flask_bare() -> Flask:
    """A Session per request, made on first use and closed in teardown; views commit."""
    engine = create_engine(os.environ["WEB_BENCH_URL"], **pool_options())
    watch(engine)
    app = _flask()

    def db() -> Session:
        if "db" not in g:
            g.db = Session(engine)
        session: Session = g.db
        return session

    @app.teardown_appcontext
    def close(error: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    @app.get("/items/")
    def read_items() -> Any:
        user = user_of(db(), _user_id())
        skip, limit = (
            flask_request.args.get("skip", 0, int),
            flask_request.args.get("limit", 20, int),
        )
        return list_items(db(), user, skip, limit)

    @app.get("/items/<int:item_id>")
    def read_item(item_id: int) -> Any:
        return public(item_of(db(), user_of(db(), _user_id()), item_id))

    @app.post("/items/")
    def create_item() -> Any:
        item = new_item(db(), user_of(db(), _user_id()), _body())
        save(db(), item)
        return public(item)

    @app.put("/items/<int:item_id>")
    def update_item(item_id: int) -> Any:
        item = item_of(db(), user_of(db(), _user_id()), item_id)
        update(item, _body())
        save(db(), item)
        return public(item)

    @app.delete("/items/<int:item_id>")
    def delete_item(item_id: int) -> Any:
        db().delete(item_of(db(), user_of(db(), _user_id()), item_id))
        save(db())
        return {"message": "Item deleted successfully"}

    return app


def flask_dbsession() -> Flask:
    """The same views under ``@unit_of_work``."""
    factory = DbSessionFactory.global_init(os.environ["WEB_BENCH_URL"], **pool_options())
    watch(factory.engine)
    app = _flask()

    @app.get("/items/")
    @unit_of_work
    def read_items(session: Session) -> Any:
        user = user_of(session, _user_id())
        skip, limit = (
            flask_request.args.get("skip", 0, int),
            flask_request.args.get("limit", 20, int),
        )
        return list_items(session, user, skip, limit)

    @app.get("/items/<int:item_id>")
    @unit_of_work
    def read_item(session: Session, item_id: int) -> Any:
        return public(item_of(session, user_of(session, _user_id()), item_id))

    @app.post("/items/")
    @unit_of_work
    def create_item(session: Session) -> Any:
        item = new_item(session, user_of(session, _user_id()), _body())
        session.flush()
        return public(item)

    @app.put("/items/<int:item_id>")
    @unit_of_work
    def update_item(session: Session, item_id: int) -> Any:
        item = item_of(session, user_of(session, _user_id()), item_id)
        update(item, _body())
        session.flush()
        return public(item)

    @app.delete("/items/<int:item_id>")
    @unit_of_work
    def delete_item(session: Session, item_id: int) -> Any:
        session.delete(item_of(session, user_of(session, _user_id()), item_id))
        return {"message": "Item deleted successfully"}

    return app


def serve_flask(name: str, port: int) -> None:
    """Serve one of the Flask apps with Werkzeug's threaded server (a thread per
    connection) until SIGTERM, then write the hold times."""
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = {"flask_bare": flask_bare, "flask_dbsession": flask_dbsession}[name]()
    server = make_server("127.0.0.1", port, app, threaded=True)
    server.socket.listen(1024)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    write_stats()


if __name__ == "__main__":
    serve_flask(sys.argv[1], int(sys.argv[2]))
