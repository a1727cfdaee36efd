"""Flask class-based views: ``MethodView.decorators = [unit_of_work(...)]`` makes each request
one unit of work (committed before the response, rolled back on an error), whose session the
methods read with ``current_session()``."""

from __future__ import annotations

from typing import Any

from helpers import require_extra
from sqlalchemy import func, select

from dbsession import DbSessionFactory, current_session
from dbsession.example.models import Supplier


def test_methodview_decorators_run_each_request_as_one_unit_of_work(
    factory: DbSessionFactory,
) -> None:
    require_extra("flask", "flask")
    from flask import Flask, abort
    from flask.views import MethodView

    from dbsession.integrations.flask import unit_of_work

    class Suppliers(MethodView):
        decorators = [unit_of_work(factory)]

        def post(self, name: str) -> tuple[dict[str, Any], int]:
            session = current_session()
            session.add(Supplier(name=name))
            session.flush()
            if name == "refused":
                abort(409)
            return {"name": name}, 201

        def get(self, name: str) -> dict[str, Any]:
            count = current_session().scalar(select(func.count()).select_from(Supplier))
            return {"count": count}

    app = Flask(__name__)
    app.add_url_rule("/suppliers/<name>", view_func=Suppliers.as_view("suppliers"))
    client = app.test_client()

    assert client.post("/suppliers/acme").status_code == 201
    assert client.post("/suppliers/refused").status_code == 409
    assert client.get("/suppliers/any").get_json() == {"count": 1}
    with factory.session_scope() as session:
        assert session.scalars(select(Supplier.name)).all() == ["acme"]
