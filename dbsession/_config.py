"""Where the database URL comes from, the options beside it, and URL masking.

Resolution order, in one place for the app, the tests and Alembic:
the explicit argument, else the ``DATABASE_URL`` environment variable, else
the embedded SQLite file ``dbsession.sqlite3`` in the current directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._errors import ConfigurationError, InvalidURLError

ENV_VAR = "DATABASE_URL"
DEFAULT_SQLITE_FILE = "dbsession.sqlite3"
DEFAULT_SQLITE_BUSY_TIMEOUT = 5.0

# A bare "postgresql://" would mean psycopg2 to SQLAlchemy; we ship psycopg 3.
_DEFAULT_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}
# The async factory's choice for a bare scheme. psycopg 3 serves both sides:
# SQLAlchemy picks its async mode under create_async_engine.
_DEFAULT_ASYNC_DRIVERS = {
    "sqlite": "aiosqlite",
    "postgresql": "psycopg",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
}
_ASYNC_ONLY_DRIVERS = frozenset({"aiosqlite", "asyncpg", "aiomysql", "asyncmy"})
_SCHEME_ALIASES = {"postgres": "postgresql"}
_SECRET_WORDS = "pass|pwd|secret|token|key"
_SECRET_QUERY_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
_MASK = "***"
#: What may sit between the app and PostgreSQL (``pooler=``); None: not said, assume the worst.
POOLERS = ("transaction", "session", "none")


@dataclass(frozen=True)
class Timeouts:
    """The driver timeouts of a factory's connections, in seconds (see ``_timeouts``).

    ``None`` turns one off. Raises ConfigurationError for a value that is not positive.
    """

    connect: float | None = 10.0
    dead_peer: float | None = 30.0
    read: float | None = 300.0
    ping: float | None = 5.0

    def __post_init__(self) -> None:
        for name in ("connect", "dead_peer", "read", "ping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigurationError(
                    f"Timeouts({name}=...) must be a positive number of seconds or None "
                    f"(no limit), got {value!r}."
                )


@dataclass(frozen=True)
class Settings:
    """Everything that decides how one factory builds its engine and sessions."""

    url: URL
    source: str = field(compare=False)
    expire_on_commit: bool = False
    sqlite_busy_timeout: float = DEFAULT_SQLITE_BUSY_TIMEOUT
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    replica_url: URL | None = None
    pooler: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_replica_lag: float | None = None

    def describe(self) -> str:
        """The masked URL and where it came from, for messages and logs."""
        replica = f" with replica {mask_url(self.replica_url)}" if self.replica_url else ""
        return f"{mask_url(self.url)} (from {self.source}){replica}"

    def for_replica(self) -> Settings:
        """The same options on the replica URL; raise ConfigurationError if there is none."""
        if self.replica_url is None:
            raise ConfigurationError(
                "No replica_url is configured; pass replica_url= to DbSessionFactory() "
                "or global_init()."
            )
        return replace(self, url=self.replica_url, source="replica_url", replica_url=None)

    def __repr__(self) -> str:
        # The dataclass repr would show the URL's secret query values (SQLAlchemy's
        # URL repr hides only the password) and any secret passed in engine options.
        return (
            f"Settings(url={mask_url(self.url)!r}, source={self.source!r}, "
            f"expire_on_commit={self.expire_on_commit!r}, "
            f"sqlite_busy_timeout={self.sqlite_busy_timeout!r}, "
            f"engine_options=<{', '.join(sorted(self.engine_options)) or 'none'}>, "
            f"pooler={self.pooler!r}, timeouts={self.timeouts!r}, "
            f"max_replica_lag={self.max_replica_lag!r})"
        )


def make_settings(
    url: str | URL | None = None,
    *,
    expire_on_commit: bool | None = None,
    sqlite_busy_timeout: float | None = None,
    engine_options: Mapping[str, Any] | None = None,
    replica_url: str | URL | None = None,
    asyncio: bool = False,
    pooler: str | None = None,
    timeouts: Timeouts | None = None,
    max_replica_lag: float | None = None,
) -> Settings:
    """Resolve the URL and normalise the options; raise ConfigurationError if they cannot work.

    With ``asyncio=True`` a URL that names no driver gets the backend's async driver
    (aiosqlite, psycopg, aiomysql); a driver named in the URL is always kept.
    ``pooler`` is one of POOLERS (see ``_pooler``); ``max_replica_lag`` needs a
    ``replica_url`` and is a number of seconds.
    """
    if pooler is not None and pooler not in POOLERS:
        raise ConfigurationError(
            f"pooler={pooler!r} is not one of {', '.join(repr(p) for p in POOLERS)}: say "
            "'transaction' behind PgBouncer (or a managed pooler) in transaction mode, "
            "'session' behind a session pooler, 'none' for a direct connection."
        )
    if max_replica_lag is not None and (replica_url is None or not max_replica_lag >= 0):
        raise ConfigurationError(
            f"max_replica_lag={max_replica_lag!r} needs a replica_url and a number of "
            "seconds (0 or more)."
        )
    if max_replica_lag is not None and not str(replica_url).startswith("postgres"):
        raise ConfigurationError(
            "max_replica_lag= is measured with PostgreSQL's pg_last_xact_replay_timestamp(); "
            "it needs a postgresql replica_url."
        )
    resolved, source = resolve_url(url, asyncio=asyncio)
    timeout = DEFAULT_SQLITE_BUSY_TIMEOUT if sqlite_busy_timeout is None else sqlite_busy_timeout
    if timeout < 0:
        raise ConfigurationError(
            f"sqlite_busy_timeout must be zero or more seconds, got {timeout!r}."
        )
    return Settings(
        url=resolved,
        source=source,
        expire_on_commit=bool(expire_on_commit),
        sqlite_busy_timeout=float(timeout),
        engine_options=dict(engine_options or {}),
        pooler=pooler,
        timeouts=timeouts if timeouts is not None else Timeouts(),
        max_replica_lag=None if max_replica_lag is None else float(max_replica_lag),
        replica_url=None
        if replica_url is None
        else _with_default_driver(_parse(replica_url, "replica_url"), _drivers(asyncio)),
    )


def resolve_url(url: str | URL | None = None, *, asyncio: bool = False) -> tuple[URL, str]:
    """Return the URL to use and where it came from: ``argument``, ``DATABASE_URL`` or ``default``.

    A URL without a driver gets the default one of its backend (the async one
    with ``asyncio=True``). Raises InvalidURLError for an empty or malformed URL.
    """
    from_env = os.environ.get(ENV_VAR)
    if url is not None:
        resolved, source = _parse(url, "argument"), "argument"
    elif from_env is not None:
        resolved, source = _parse(from_env, ENV_VAR), ENV_VAR
    else:
        resolved, source = default_sqlite_url(), "default"
    return _with_default_driver(resolved, _drivers(asyncio)), source


def sync_twin(url: URL) -> URL:
    """The URL with an async driver swapped for the sync one dbsession ships for its backend
    (for the work done outside the event loop, such as migrations); other URLs unchanged."""
    backend = url.get_backend_name()
    if url.get_driver_name() in _ASYNC_ONLY_DRIVERS:
        sync = _DEFAULT_DRIVERS.get(backend)
        return url.set(drivername=backend if sync is None else f"{backend}+{sync}")
    return url


def async_twin(url: URL) -> URL:
    """The URL with a sync-only driver swapped for the async one dbsession ships for its
    backend (aiosqlite, aiomysql; psycopg serves both sides); async URLs and backends
    without a known async driver unchanged."""
    backend = _SCHEME_ALIASES.get(url.get_backend_name(), url.get_backend_name())
    driver = url.get_driver_name()
    async_driver = _DEFAULT_ASYNC_DRIVERS.get(backend)
    if async_driver is None or driver in _ASYNC_ONLY_DRIVERS or driver == async_driver:
        return url
    return url.set(drivername=f"{backend}+{async_driver}")


def _drivers(asyncio: bool) -> Mapping[str, str]:
    return _DEFAULT_ASYNC_DRIVERS if asyncio else _DEFAULT_DRIVERS


def default_sqlite_url() -> URL:
    """The embedded default: ``dbsession.sqlite3`` in the current working directory."""
    return URL.create("sqlite", database=str(Path.cwd() / DEFAULT_SQLITE_FILE))


def mask_url(url: URL | str) -> str:
    """Render a URL with its password, and secret-looking query values, replaced by ``***``."""
    if isinstance(url, str):
        return _mask_raw(url)
    secret_keys = [key for key in url.query if _SECRET_QUERY_KEY.search(key)]
    if secret_keys:
        url = url.update_query_dict({key: _MASK for key in secret_keys})
    return url.render_as_string(hide_password=True)


def scrub(text: str, url: URL) -> str:
    """Remove the URL's password and secret query values from an arbitrary message."""
    secrets = [url.password] if url.password else []
    for key, value in url.query.items():
        if _SECRET_QUERY_KEY.search(key):
            secrets.extend([value] if isinstance(value, str) else value)
    for secret in secrets:
        if secret:
            text = text.replace(str(secret), _MASK)
    return text


def first_line(error: BaseException, url: URL) -> str:
    """The driver's message, first line only, with the URL's secrets removed."""
    return scrub((str(error).strip().splitlines() or [""])[0], url)


def _parse(raw: str | URL, source: str) -> URL:
    where = {"argument": "the url argument", "replica_url": "the replica_url argument"}.get(
        source, f"the {source} environment variable"
    )
    if isinstance(raw, str):
        if not raw.strip():
            raise InvalidURLError(
                f"The database URL in {where} is empty. Set it to a URL such as "
                "'postgresql+psycopg://user:password@host:5432/dbname', or leave "
                f"{ENV_VAR} unset to use the embedded SQLite file."
            )
        try:
            parsed = make_url(raw.strip())
        except (ArgumentError, ValueError):
            raise InvalidURLError(
                f"The database URL in {where} cannot be parsed: {_mask_raw(raw)!r}. "
                "Expected 'dialect+driver://user:password@host:port/dbname', e.g. "
                "'postgresql+psycopg://app:secret@localhost:5432/app' or "
                "'sqlite:///path/to/file.db'; percent-encode special characters "
                "in the password."
            ) from None
    else:
        parsed = raw
    return parsed


def _with_default_driver(url: URL, drivers: Mapping[str, str]) -> URL:
    backend = _SCHEME_ALIASES.get(url.get_backend_name(), url.get_backend_name())
    if "+" not in url.drivername and backend in drivers:
        return url.set(drivername=f"{backend}+{drivers[backend]}")
    if backend != url.get_backend_name():
        return url.set(drivername=url.drivername.replace(url.get_backend_name(), backend, 1))
    return url


def _mask_raw(raw: str) -> str:
    """Best-effort masking of a string that may not even parse as a URL."""
    masked = re.sub(r"(://[^:/@]*:).*@", rf"\g<1>{_MASK}@", raw)
    return re.sub(
        rf"([?&][^=&]*(?:{_SECRET_WORDS})[^=&]*=)[^&]*",
        rf"\g<1>{_MASK}",
        masked,
        flags=re.IGNORECASE,
    )
