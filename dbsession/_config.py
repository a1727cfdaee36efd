"""Where the database URL comes from, the options beside it, and URL masking.

Resolution order, in one place for the app, the tests and Alembic:
the explicit argument, else the ``DATABASE_URL`` environment variable, else
the embedded SQLite file ``dbsession.sqlite3`` in the current directory.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._errors import ConfigurationError, InvalidURLError, UnsupportedIsolationLevelError

ENV_VAR = "DATABASE_URL"
DEFAULT_SQLITE_FILE = "dbsession.sqlite3"
DEFAULT_SQLITE_BUSY_TIMEOUT = 5.0
_MAX_BUSY_TIMEOUT = (2**31 - 1) // 1000

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
# Query parameters whose values are secrets: these exact names, and names with these
# endings (sslpassword, api_key, access_token), never a substring (foreign_keys is not).
_SECRET_NAME = r"(?:pass|pwd|key|apikey|[^=&]*(?:password|passwd|secret|token|_pwd|_pass|_key))"
_SECRET_QUERY_KEY = re.compile(rf"{_SECRET_NAME}\Z", re.IGNORECASE)
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
    #: A pooled server connection idle longer than this is pinged (bounded by ``ping``)
    #: before use; one used more recently is pinged only if its socket has something to
    #: say (closed, or an error waiting). 0 pings on every checkout, as pool_pre_ping.
    ping_after_idle: float = 30.0

    def __post_init__(self) -> None:
        if not self.ping_after_idle >= 0:
            raise ConfigurationError(
                "Timeouts(ping_after_idle=...) must be zero (ping on every checkout) or a "
                f"positive number of seconds, got {self.ping_after_idle!r}."
            )
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


#: What a database URL may be given as: a string, a SQLAlchemy URL, or the path of a SQLite file.
URLLike = str | URL | os.PathLike[str]


def make_settings(
    url: URLLike | None = None,
    *,
    expire_on_commit: bool | None = None,
    sqlite_busy_timeout: float | None = None,
    engine_options: Mapping[str, Any] | None = None,
    replica_url: URLLike | None = None,
    asyncio: bool = False,
    pooler: str | None = None,
    timeouts: Timeouts | None = None,
    max_replica_lag: float | None = None,
) -> Settings:
    """Resolve the URL and normalise the options; raise ConfigurationError if they cannot work
    (a bad ``sqlite_busy_timeout`` or ``expire_on_commit``, ``connect_args`` that is not a
    dict, an async-only driver on the sync side).

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
    replica = None if replica_url is None else _parse(replica_url, "replica_url")
    if not asyncio:
        for checked in (resolved, replica):
            _refuse_async_driver(checked)
    options = dict(engine_options or {})
    connect_args = options.get("connect_args")
    if connect_args is not None and not isinstance(connect_args, Mapping):
        raise ConfigurationError(
            f"connect_args must be a dict of driver options, got "
            f"{type(connect_args).__name__}: pass connect_args={{'connect_timeout': 5}}."
        )
    _refuse_autocommit(engine_options or {})
    return Settings(
        url=resolved,
        source=source,
        expire_on_commit=_flag("expire_on_commit", expire_on_commit),
        sqlite_busy_timeout=_busy_timeout(sqlite_busy_timeout),
        engine_options=options,
        pooler=pooler,
        timeouts=timeouts if timeouts is not None else Timeouts(),
        max_replica_lag=None if max_replica_lag is None else float(max_replica_lag),
        replica_url=None if replica is None else _with_default_driver(replica, _drivers(asyncio)),
    )


def _flag(name: str, value: object) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ConfigurationError(
        f"{name} must be True or False, got {value!r} ({type(value).__name__})."
    )


def _busy_timeout(value: object) -> float:
    if value is None:
        return DEFAULT_SQLITE_BUSY_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"sqlite_busy_timeout must be a number of seconds, got {type(value).__name__} "
            f"{value!r}: pass e.g. sqlite_busy_timeout=5.0."
        )
    if not math.isfinite(value) or not 0 <= value <= _MAX_BUSY_TIMEOUT:
        raise ConfigurationError(
            f"sqlite_busy_timeout must be a number of seconds from 0 to {_MAX_BUSY_TIMEOUT} "
            f"(SQLite counts milliseconds in 32 bits), got {value!r}: pass e.g. "
            "sqlite_busy_timeout=5.0."
        )
    return float(value)


def _refuse_async_driver(url: URL | None) -> None:
    driver = None if url is None else url.drivername.partition("+")[2]
    if url is not None and driver in _ASYNC_ONLY_DRIVERS:
        raise ConfigurationError(
            f"{mask_url(url)} names the async driver {driver!r}, which the "
            f"sync DbSessionFactory cannot use: use dbsession.asyncio.AsyncDbSessionFactory, "
            f"or {mask_url(sync_twin(url))} here."
        )


def isolation_name(level: object) -> str:
    """An isolation level as SQLAlchemy spells it: ``"read_committed"`` -> ``"READ COMMITTED"``."""
    return " ".join(str(level).replace("_", " ").upper().split())


def _refuse_autocommit(engine_options: Mapping[str, Any]) -> None:
    """Raise UnsupportedIsolationLevelError for AUTOCOMMIT as the engine's isolation level
    (``isolation_level=`` or inside ``execution_options=``): it would switch every
    scope's transaction off, so a failed scope would keep the writes it made."""
    execution_options = engine_options.get("execution_options") or {}
    for where, level in (
        ("isolation_level=", engine_options.get("isolation_level")),
        ("execution_options={'isolation_level': ...}", execution_options.get("isolation_level")),
    ):
        if level is not None and isolation_name(level) == "AUTOCOMMIT":
            raise UnsupportedIsolationLevelError(
                f"{where}'AUTOCOMMIT' as an engine option would switch off the transaction "
                "of every scope (a failed scope would keep its writes). Remove it: for a "
                "statement outside any transaction use factory.engine.connect()"
                ".execution_options(isolation_level='AUTOCOMMIT'); for a scope's level use "
                "session_scope(isolation_level='READ COMMITTED') or another level."
            )


def resolve_url(url: URLLike | None = None, *, asyncio: bool = False) -> tuple[URL, str]:
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


def is_secret_parameter(name: str) -> bool:
    """True for a query parameter whose value is a secret: ``password``, ``sslpassword``,
    ``api_key``, ``access_token``... (exact names and endings, not substrings)."""
    return _SECRET_QUERY_KEY.match(name) is not None


def mask_url(url: URL | str) -> str:
    """Render a URL with its password, and secret query values, replaced by ``***``."""
    if isinstance(url, str):
        return _mask_raw(url)
    secret_keys = [key for key in url.query if is_secret_parameter(key)]
    if secret_keys:
        url = url.update_query_dict({key: _MASK for key in secret_keys})
    return url.render_as_string(hide_password=True)


def scrub(text: str, url: URL) -> str:
    """Remove the URL's password and secret query values from an arbitrary message."""
    for secret in secrets_of(url):
        for form in _spellings(secret):
            text = text.replace(form, _MASK)
    return text


def first_line(error: BaseException, url: URL) -> str:
    """The driver's message, first line only, with the URL's secrets removed."""
    return scrub((str(error).strip().splitlines() or [""])[0], url)


def secrets_of(url: URL) -> list[str]:
    """The URL's password and secret query values (what must never be shown)."""
    secrets = [str(url.password)] if url.password else []
    for key, value in url.query.items():
        if is_secret_parameter(key):
            secrets.extend([value] if isinstance(value, str) else value)
    return [secret for secret in secrets if secret]


def _spellings(secret: str) -> list[str]:
    """A secret as it is, percent-encoded, and as a repr or bytes repr would show it."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), repr(secret)[1:-1]}
    forms.add(repr(secret.encode("utf-8", "surrogatepass"))[2:-1])
    return sorted(forms, key=len, reverse=True)


def _parse(raw: URLLike, source: str) -> URL:
    where = {"argument": "the url argument", "replica_url": "the replica_url argument"}.get(
        source, f"the {source} environment variable"
    )
    if isinstance(raw, os.PathLike):  # a pathlib.Path: a SQLite file
        return URL.create("sqlite", database=str(Path(raw).expanduser().absolute()))
    if not isinstance(raw, (str, URL)):
        raise InvalidURLError(
            f"The database URL in {where} must be a str, a sqlalchemy URL or a pathlib.Path "
            f"of a SQLite file, not {type(raw).__name__}: decode bytes first."
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
    _refuse_misplaced_secret(parsed, where)
    has_credentials = parsed.host or parsed.username or parsed.password
    if parsed.get_backend_name() == "sqlite" and has_credentials:
        raise InvalidURLError(
            f"The SQLite URL in {where} names a user, password or host, which SQLite has "
            "none of (not shown: part of a password may be in its path). Use "
            "sqlite:///relative/file.db, "
            "sqlite:////absolute/file.db or sqlite:// (in memory)."
        )
    if parsed.get_backend_name() == "sqlite" and (parsed.database or "").startswith("~"):
        parsed = parsed.set(database=str(Path(parsed.database or "").expanduser()))
    return parsed


def _misread_option(key: str, value: str | tuple[str, ...]) -> bool:
    """A query option that is really a piece of the user, password or path: a name that is
    empty or holds ``/ : @ ?``, or a value holding a second ``?``."""
    values = [value] if isinstance(value, str) else list(value)
    return not key or any(c in key for c in "/:@?") or any("?" in v for v in values)


def _refuse_misplaced_secret(url: URL, where: str) -> None:
    """Refuse a URL where an unencoded ``@`` in the password (or ``/`` in the user name)
    moved part of the password into the host or database name, where it would be shown."""
    host = url.host or ""
    database = url.database or ""
    if url.get_backend_name() == "sqlite":
        # "sqlite:///user:password@/path" puts the credentials in the file's path.
        misread = ":" in database[: database.rfind("@") + 1]
    else:  # "mysql://us/er:pw@db/app": host "us", database "er:pw@db/app"
        misread = "@" in database or ":" in database
    misread = misread or any(_misread_option(key, value) for key, value in url.query.items())
    if "@" in host or misread:
        raise InvalidURLError(
            f"The database URL in {where} has an '@', '/' or '?' in its user name, password "
            f"or path that is not percent-encoded, so part of the password would be read as "
            f"the host, database name or an option (in a {url.drivername}:// URL). "
            "Percent-encode the user name and password (urllib.parse.quote(password, "
            "safe='')), e.g. '@' as %40 and '/' as %2F."
        )


def _with_default_driver(url: URL, drivers: Mapping[str, str]) -> URL:
    backend = _SCHEME_ALIASES.get(url.get_backend_name(), url.get_backend_name())
    if "+" not in url.drivername and backend in drivers:
        return url.set(drivername=f"{backend}+{drivers[backend]}")
    if backend != url.get_backend_name():
        return url.set(drivername=url.drivername.replace(url.get_backend_name(), backend, 1))
    return url


def _mask_raw(raw: str) -> str:
    """Best-effort masking of a string that may not even parse as a URL: everything
    between the user name and the last ``@`` (a newline or an ``@`` included) is hidden."""
    masked = re.sub(r"(://[^:@]*:).*@", rf"\g<1>{_MASK}@", raw, flags=re.DOTALL)
    return re.sub(
        rf"([?&]{_SECRET_NAME}=)[^&]*",
        rf"\g<1>{_MASK}",
        masked,
        flags=re.IGNORECASE | re.DOTALL,
    )


def hosts_of(url: URL) -> list[str]:
    """Every ``host:port`` a server URL names, in the order the driver tries them: the
    URL's own host, then libpq's multi-host forms in the query string, ``?host=a:p&host=b:q``
    and ``?host=a,b&port=p,q`` (one port for all, or one per host; none: the default).
    A Unix-socket folder is given as is. ``["localhost:<default port>"]`` if none is named."""
    default = 5432 if url.get_backend_name() == "postgresql" else 3306
    query_hosts = url.query.get("host", ())
    query_ports = url.query.get("port", ())
    hosts = [
        part.strip()
        for value in ([query_hosts] if isinstance(query_hosts, str) else query_hosts)
        for part in value.split(",")
    ]
    ports = [
        part.strip()
        for value in ([query_ports] if isinstance(query_ports, str) else query_ports)
        for part in value.split(",")
    ]
    named: list[str] = []
    if url.host:
        named.append(f"{url.host}:{url.port or default}")
    for index, host in enumerate(hosts):
        if host.startswith("/"):
            named.append(host)
            continue
        if host.startswith("[") and "]" in host:  # [::1]:5433
            address, _, port = host[1:].partition("]")
            port = port.lstrip(":")
        elif host.count(":") == 1:
            address, _, port = host.partition(":")
        else:
            address, port = host, ""
        if not port:
            port = ports[index] if index < len(ports) else (ports[0] if len(ports) == 1 else "")
        named.append(f"{address or 'localhost'}:{port or url.port or default}")
    return named or [f"localhost:{url.port or default}"]
