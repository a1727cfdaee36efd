"""DbSessionFactory: one engine and sessionmaker per connection string, built lazily and once."""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ._base import Base
from ._config import Settings
from ._engine import make_engine, write_options
from ._lifecycle import DefaultOrSelf, LazyFactory
from ._scope import unit_of_work

logger = logging.getLogger("dbsession")


@dataclass(frozen=True)
class _Built:
    engine: Engine
    writer: sessionmaker[Session]
    reader: sessionmaker[Session]


class DbSessionFactory(LazyFactory[_Built]):
    """Owns one engine and its sessionmakers for one database URL.

    The process default is configured with :meth:`global_init` (or lazily, on first
    use, from ``DATABASE_URL`` or the embedded SQLite file) and used through the class
    itself: ``DbSessionFactory.session_scope()``. Further databases get instances:
    ``reports = DbSessionFactory(url)``, which have the same methods.

    Raises ConfigurationError subclasses when the URL or options cannot work.
    """

    _default: ClassVar[DbSessionFactory | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The engine, built on first access."""
        return self._build().engine

    def _make(self, settings: Settings) -> _Built:
        engine = make_engine(settings)
        expire = settings.expire_on_commit
        writer = sessionmaker(
            bind=engine.execution_options(**write_options(settings.url)), expire_on_commit=expire
        )
        reader = sessionmaker(bind=engine, expire_on_commit=expire)
        return _Built(engine, writer, reader)

    def _session_scope(self) -> AbstractContextManager[Session]:
        """Open a unit of work: a fresh Session committed on success and rolled back on any error.

        ``with DbSessionFactory.session_scope() as session: ...``. The exception that
        ended the block is re-raised unchanged after the rollback; the session is
        always closed. Raises DatabaseUnreachableError when no connection can be opened.
        """
        return unit_of_work(self._build().writer)

    def _create_session(self) -> Session:
        """Return a new Session that the caller commits, rolls back and closes itself."""
        return self._build().writer()

    def _get_engine(self) -> Engine:
        """Return the engine, building it on first use."""
        return self._build().engine

    def _create_all(self, metadata: MetaData | None = None) -> None:
        """Create the missing tables of ``metadata`` (default: ``dbsession.Base.metadata``).

        A quick-start convenience; an app with migrations runs Alembic instead.
        """
        (metadata or Base.metadata).create_all(self._build().engine)

    def _dispose(self) -> None:
        """Close the pool's connections; the next use builds a new engine.

        On the class, ``DbSessionFactory.dispose()`` also forgets the process default,
        so ``global_init()`` may be called again with another URL.
        """
        built = self._detach()
        if built is not None:
            built.engine.dispose()
            logger.debug("dbsession: engine disposed for %s", self._settings.describe())

    session_scope = DefaultOrSelf(_session_scope)
    create_session = DefaultOrSelf(_create_session)
    get_engine = DefaultOrSelf(_get_engine)
    create_all = DefaultOrSelf(_create_all)
    dispose = DefaultOrSelf(_dispose, no_default=lambda: None)


def session_scope() -> AbstractContextManager[Session]:
    """Open a unit of work on the process default factory; see DbSessionFactory.session_scope."""
    return DbSessionFactory.default()._session_scope()


def create_session() -> Session:
    """Return a new Session of the process default factory that the caller manages."""
    return DbSessionFactory.default()._create_session()
