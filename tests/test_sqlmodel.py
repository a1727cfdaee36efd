"""SQLModel: the factory makes the app's Session class (``session_class=sqlmodel.Session``),
so ``session.exec()`` works in every scope, with dbsession's guarantees: commit at the end,
rollback on error, on_commit hooks, joined scopes, read-only scopes (docs/web.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import orm
from sqlalchemy.engine import URL

from dbsession import DbSessionFactory, ReadOnlyError, on_commit
from dbsession.errors import ConfigurationError

sqlmodel = pytest.importorskip("sqlmodel", reason="needs pip install 'sqlalchemy-dbsession[test]'")
from sqlmodel import Field, Session, SQLModel, select  # noqa: E402


class Hero(SQLModel, table=True):
    __tablename__ = "sqlmodel_hero"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=50)


@pytest.fixture
def heroes(backend_url: URL) -> Iterator[DbSessionFactory]:
    made = DbSessionFactory(backend_url, session_class=Session)
    SQLModel.metadata.create_all(made.engine)
    yield made
    SQLModel.metadata.drop_all(made.engine)
    made.dispose()


def test_scopes_are_sqlmodel_sessions_with_every_guarantee(heroes: DbSessionFactory) -> None:
    ran: list[str] = []
    with heroes.session_scope() as session:
        assert isinstance(session, Session)
        session.add(Hero(name="Deadpond"))
        on_commit(lambda: ran.append("committed"))
        with heroes.session_scope() as joined:  # a SAVEPOINT of the same transaction
            assert joined is session
    assert ran == ["committed"]

    with pytest.raises(ZeroDivisionError), heroes.session_scope() as session:
        session.add(Hero(name="Rusty-Man"))
        on_commit(lambda: ran.append("rolled back"))
        raise ZeroDivisionError

    with heroes.session_scope(readonly=True) as session:
        assert isinstance(session, Session)
        assert session.exec(select(Hero.name)).all() == ["Deadpond"]
        session.add(Hero(name="Spider-Boy"))
        with pytest.raises(ReadOnlyError):
            session.flush()
    assert ran == ["committed"]


def test_run_in_transaction_passes_the_sqlmodel_session(heroes: DbSessionFactory) -> None:
    def add(session: orm.Session, name: str) -> int:
        assert isinstance(session, Session)  # what type checkers see is SQLAlchemy's Session
        hero = Hero(name=name)
        session.add(hero)
        session.flush()
        assert hero.id is not None
        return hero.id

    hero_id = heroes.run_in_transaction(add, "Tarantula")
    with heroes.session_scope() as session:
        assert isinstance(session, Session)
        assert session.exec(select(Hero).where(Hero.id == hero_id)).one().name == "Tarantula"


def test_a_class_that_is_not_a_session_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="session_class=.* is not a subclass of"):
        DbSessionFactory("sqlite://", session_class=dict)
