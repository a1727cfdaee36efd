"""One engine and its sessionmakers: one per kind of scope (read-only or not, isolation level)."""

from __future__ import annotations

import threading

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from ._engine import isolation_levels, scope_options
from ._errors import UnsupportedIsolationLevelError


def normalize_isolation_level(level: str | None) -> str | None:
    """``"read_committed"`` -> ``"READ COMMITTED"``; AUTOCOMMIT is refused (a scope is a
    transaction). Raises UnsupportedIsolationLevelError."""
    if level is None:
        return None
    normalized = " ".join(str(level).replace("_", " ").upper().split())
    if normalized == "AUTOCOMMIT":
        raise UnsupportedIsolationLevelError(
            "isolation_level='AUTOCOMMIT' cannot be used for a scope: a scope is one "
            "transaction. Use engine.connect().execution_options(isolation_level="
            "'AUTOCOMMIT') for statements outside a transaction."
        )
    return normalized


class Binding:
    """An engine and, made once each and cached, the sessionmaker of every kind of scope.

    The engines behind them are ``engine.execution_options(...)`` views, sharing
    the pool; see ``_engine.scope_options`` for what each kind sets.
    """

    def __init__(self, engine: Engine, *, expire_on_commit: bool) -> None:
        self.engine = engine
        self._expire_on_commit = expire_on_commit
        self._makers: dict[tuple[bool, str | None], sessionmaker[Session]] = {}
        self._levels: tuple[str, ...] | None = None
        self._lock = threading.Lock()
        self._joined: sessionmaker[Session] | None = None

    def maker(
        self, *, readonly: bool = False, isolation_level: str | None = None
    ) -> sessionmaker[Session]:
        """The sessionmaker for this kind of scope; ``isolation_level`` already normalized.

        Raises UnsupportedIsolationLevelError if the backend has no such level.
        """
        if self._joined is not None:
            return self._joined
        key = (readonly, isolation_level)
        made = self._makers.get(key)
        if made is not None:
            return made
        if isolation_level is not None:
            self._check_level(isolation_level)
        with self._lock:
            made = self._makers.get(key)
            if made is None:
                options = scope_options(
                    self.engine, readonly=readonly, isolation_level=isolation_level
                )
                bind = self.engine.execution_options(**options) if options else self.engine
                made = sessionmaker(bind=bind, expire_on_commit=self._expire_on_commit)
                self._makers[key] = made
            return made

    def joined_to(self, connection: Connection) -> Binding:
        """A Binding on the same engine whose every session joins ``connection``'s transaction.

        For dbsession.testing: a session's commit releases a SAVEPOINT and its rollback
        rolls back to it, while the caller's outer transaction stays open. Read-only
        and isolation level requests are not applied: the transaction is already open.
        """
        clone = Binding(self.engine, expire_on_commit=self._expire_on_commit)
        clone._joined = sessionmaker(
            bind=connection,
            join_transaction_mode="create_savepoint",
            expire_on_commit=self._expire_on_commit,
        )
        return clone

    def _check_level(self, level: str) -> None:
        if self._levels is None:
            levels = isolation_levels(self.engine)
            self._levels = tuple(level for level in levels if level != "AUTOCOMMIT")
        if level not in self._levels:
            raise UnsupportedIsolationLevelError(
                f"Isolation level {level!r} is not supported by {self.engine.dialect.name}; "
                f"use one of: {', '.join(sorted(self._levels))}."
            )
