"""Smoke test of one extra, run by .ci/extras.sh in a fresh venv that has only that extra.

``python smoke.py EXTRA`` (``core``, ``postgres``, ``mysql``, ``async``, ``fastapi``,
``flask``) imports the extra's public modules and runs one real unit of work through
them, from an empty folder, against the installed wheel (never the source tree).
Server URLs: DBSESSION_TEST_POSTGRES_URL / DBSESSION_TEST_MYSQL_URL, else the local ones.
"""
# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time.

import asyncio
import importlib
import json
import os
import subprocess
import sys
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sqlalchemy import String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import dbsession
from dbsession import DbSessionFactory, session_scope

POSTGRES = os.environ.get("DBSESSION_TEST_POSTGRES_URL") or (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL = os.environ.get("DBSESSION_TEST_MYSQL_URL") or "mysql+pymysql://root@127.0.0.1:3306/test"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = f"smoke_{uuid.uuid4().hex[:8]}"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"smoke: FAILED: {what}")


def unit_of_work(url: str) -> None:
    """Create a table of its own, commit a row, roll one back, read, drop the table."""
    factory = DbSessionFactory(url)
    Base.metadata.create_all(factory.engine)
    try:
        with factory.session_scope() as session:
            session.add(Item(name="kept"))
        try:
            with factory.session_scope() as session:
                session.add(Item(name="rolled back"))
                session.flush()
                raise LookupError
        except LookupError:
            pass
        with factory.session_scope() as session:
            names = session.scalars(select(Item.name)).all()
        check(list(names) == ["kept"], f"unit of work on {factory.engine.dialect.name}: {names}")
    finally:
        Base.metadata.drop_all(factory.engine)
        factory.dispose()


def core() -> None:
    check(
        dbsession.__version__ == version("sqlalchemy-dbsession"),
        "dbsession.__version__ from metadata",
    )
    for name in ("dbsession.migrations", "dbsession.cli", "dbsession.example.store"):
        importlib.import_module(name)
    check("sqlalchemy.ext.asyncio" not in sys.modules, "import dbsession stays sync")
    unit_of_work("sqlite:///smoke.sqlite3")
    for _ in range(2):  # the main job, from this empty folder, twice
        done = subprocess.run([sys.executable, "-m", "dbsession.example"], check=False)
        check(done.returncode == 0, "python -m dbsession.example")
    done = subprocess.run(["dbsession", "--help"], capture_output=True, check=False)
    check(done.returncode == 0, "the dbsession console script")


def postgres() -> None:
    importlib.import_module("psycopg")
    unit_of_work(POSTGRES)


def mysql() -> None:
    importlib.import_module("pymysql")
    unit_of_work(MYSQL)


def async_() -> None:
    from dbsession.asyncio import AsyncDbSessionFactory

    async def main(url: str) -> None:
        factory = AsyncDbSessionFactory(url)
        await factory.create_all(Base.metadata)
        try:
            async with factory.session_scope() as session:
                session.add(Item(name="kept"))
            async with factory.session_scope() as session:
                names = (await session.scalars(select(Item.name))).all()
            check(list(names) == ["kept"], f"async unit of work on {url.split(':')[0]}: {names}")
        finally:
            async with factory.engine.begin() as connection:
                await connection.run_sync(Base.metadata.drop_all)
            await factory.dispose()

    asyncio.run(main("sqlite+aiosqlite:///smoke-async.sqlite3"))
    asyncio.run(main(MYSQL.replace("+pymysql", "+aiomysql")))


def fastapi() -> None:
    from fastapi import FastAPI

    from dbsession.integrations.fastapi import DbSession

    check("sqlalchemy.ext.asyncio" not in sys.modules, "the FastAPI integration stays sync")
    factory = DbSessionFactory.global_init("sqlite:///smoke-fastapi.sqlite3")
    Base.metadata.create_all(factory.engine)
    app = FastAPI()

    @app.post("/items")
    def create(session: DbSession) -> dict[str, int]:
        session.add(Item(name="via fastapi"))
        session.flush()
        return {"rows": len(session.scalars(select(Item)).all())}

    status, body = asyncio.run(_asgi_post(app, "/items"))
    check(status == 200 and json.loads(body) == {"rows": 1}, f"FastAPI: {status} {body!r}")
    with session_scope() as session:
        check(session.scalar(text(f"SELECT count(*) FROM {Item.__tablename__}")) == 1, "commit")


async def _asgi_post(app: Any, path: str) -> tuple[int, bytes]:
    """One POST through the ASGI interface (no HTTP client is part of the extra)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"smoke")], "client": ("127.0.0.1", 1),
        "server": ("smoke", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def flask() -> None:
    from flask import Flask

    from dbsession.integrations.flask import unit_of_work as flask_unit_of_work

    factory = DbSessionFactory.global_init("sqlite:///smoke-flask.sqlite3")
    Base.metadata.create_all(factory.engine)
    app = Flask("smoke")

    @app.post("/items")
    @flask_unit_of_work()
    def create(session: Session) -> tuple[dict[str, str], int]:
        session.add(Item(name="via flask"))
        return {"ok": "yes"}, 201

    response = app.test_client().post("/items")
    check(response.status_code == 201, f"Flask: {response.status_code}")
    with session_scope() as session:
        check(session.scalars(select(Item.name)).all() == ["via flask"], "Flask commit")


if __name__ == "__main__":
    extra = sys.argv[1]
    check(Path.cwd().resolve() != Path(__file__).resolve().parents[1], "run from an empty folder")
    check(
        not Path(dbsession.__file__).resolve().is_relative_to(Path(__file__).resolve().parents[1]),
        "dbsession must come from the installed wheel, not the source tree",
    )
    {"core": core, "postgres": postgres, "mysql": mysql, "async": async_, "fastapi": fastapi,
     "flask": flask}[extra]()  # fmt: skip
    print(f"smoke: sqlalchemy-dbsession[{extra}] OK")
