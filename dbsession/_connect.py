"""The driver's connection: opening it (the pool's creator, with masked secrets and named
failures), and calling it from SQLAlchemy's sync side.

Every connection is opened through :class:`Connector`, so the driver's connect failures
are raised from dbsession's own frame as named errors, without the driver's frames,
locals or chained exceptions (which hold the password), and the password in the connect
arguments has a masked repr in every frame that remains (SQLAlchemy's own creator keeps
them, unmasked, in its closure). The connect arguments are worked out once, when the
engine is built: a relative SQLite path is resolved then, and a later ``os.chdir`` cannot
move the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL, Engine

from ._config import Settings, first_line, hosts_of, is_secret_parameter, secrets_of
from ._errors import ConfigurationError, DatabaseUnreachableError, DbSessionError, SQLitePathError


class _Secret(str):
    """A password whose repr is masked: what pytest, debuggers and error trackers show of
    the driver's keyword arguments in a traceback's frames. It is still the password."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class _Utf8Secret(_Secret):
    """A non-ASCII MySQL/MariaDB password, sent UTF-8 encoded: PyMySQL and aiomysql encode
    a password as latin-1, but the server keeps the hash of the bytes the ``mysql`` client
    (utf8mb4) sent when the password was set, and ``€`` has no latin-1 form at all."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, "utf-8", errors)


class Connector:
    """The pool's creator (``create_engine(creator=...)``); see the module docstring."""

    def __init__(
        self, settings: Settings, connect_args: Mapping[str, Any], defaults: Mapping[str, Any]
    ) -> None:
        self.settings = settings
        self._connect_args = dict(connect_args)
        self._defaults = dict(defaults)
        self._engine: Engine | None = None
        self._args: tuple[list[Any], dict[str, Any]] = ([], {})
        self._nodes: list[dict[str, Any]] = [{}]

    def attach(self, engine: Engine) -> None:
        """Work out the connect arguments of ``engine`` (built with this creator) once."""
        self._engine = engine
        url = engine.url
        if url.get_backend_name() in ("mysql", "mariadb") and "host" in url.query:
            # A MySQL/MariaDB host list (``?host=a:3306&host=b:3306``): PyMySQL and
            # aiomysql take one host, so the nodes are tried here, in order.
            self._nodes = [_node(hostport) for hostport in hosts_of(url)]
            url = url.difference_update_query(["host", "port"])
        self._args = _masked_connect_args(url, engine.dialect, self._connect_args, self._defaults)

    def __call__(self, connection_record: Any = None) -> Any:
        assert self._engine is not None
        dialect = self._engine.dialect
        cargs, cparams = self._args
        failure: Exception | None = None
        for node in self._nodes:
            try:
                return dialect.connect(*cargs, **{**cparams, **node})
            except Exception as error:
                failure = connect_failure(error, dialect, self.settings, self._engine.url)
                if not isinstance(failure, DatabaseUnreachableError):
                    break  # a wrong option or password is wrong on every node
        assert failure is not None
        raise failure from None  # outside the except block: no driver frames, no context


def _node(hostport: str) -> dict[str, Any]:
    """The ``host`` and ``port`` connect arguments of one ``host:port`` of a host list."""
    host, _, port = hostport.rpartition(":")
    return {"host": host.strip("[]"), "port": int(port)}


def _masked_connect_args(
    url: URL, dialect: Any, connect_args: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """dbsession's ``defaults`` (timeouts, prepared statements), overridden by the
    dialect's connect arguments for ``url`` (its query string), overridden by
    ``connect_args`` (as in SQLAlchemy); the password and secret options wrapped so their
    repr is masked."""
    cargs, cparams = dialect.create_connect_args(url)
    secrets = set(secrets_of(url))
    secret = _Utf8Secret if dialect.driver in ("pymysql", "aiomysql") else _Secret
    return list(cargs), {
        key: secret(value)
        if isinstance(value, str) and (value in secrets or is_secret_parameter(key))
        else value
        for key, value in {**defaults, **cparams, **connect_args}.items()
    }


def connect_failure(error: Exception, dialect: Any, settings: Settings, url: URL) -> DbSessionError:
    """The named error for a driver's refusal to open a connection."""
    backend = url.get_backend_name()
    dbapi = dialect.loaded_dbapi
    if backend == "sqlite" and isinstance(error, dbapi.Error):
        return SQLitePathError(
            f"Cannot open the SQLite database {url.database!r}: {first_line(error, url)}. "
            "Check the path, its permissions and the URL's options (mode=, vfs=)."
        )
    if isinstance(error, UnicodeError):
        return ConfigurationError(
            f"The {backend} driver cannot send the user name or password of "
            f"{settings.describe()}: it has characters the driver's protocol cannot encode. "
            "Use ASCII characters there (dbsession sends a MySQL/MariaDB password as UTF-8)."
        )
    if isinstance(error, dbapi.OperationalError):
        replica = settings.source == "replica_url"
        server, setting = ("replica", " (replica_url=)") if replica else ("server", "")
        return DatabaseUnreachableError(
            f"Cannot connect to the {backend} {server} at {where(url)} "
            f"(database {url.database!r}, user {url.username!r}): "
            f"{first_line(error, url)}. Check that the {server} is running and that the "
            f"URL {settings.describe()}{setting} is right."
        )
    given = sorted({*url.query, *settings.engine_options.get("connect_args", {})})
    return ConfigurationError(
        f"The {backend} driver refused the connection options of {settings.describe()}"
        f"{suspects(str(error), url) or ''} ({type(error).__name__}: {first_line(error, url)})."
        f" Fix the URL's query string or connect_args (options given: "
        f"{', '.join(given) or 'none'})."
    )


def where(url: URL) -> str:
    """Every ``host:port`` a server URL names (libpq's multi-host forms included), in the
    order the driver tries them."""
    return ", ".join(hosts_of(url))


def suspects(message: str, url: URL) -> str:
    """`` 'name'`` for the URL query options whose name or value the driver's message
    quotes (secret values are never looked at), else the empty string."""
    named = [
        key
        for key, value in url.query.items()
        if key in message
        or (not is_secret_parameter(key) and isinstance(value, str) and repr(value) in message)
    ]
    return f" {', '.join(repr(key) for key in named)}" if named else ""


def call_driver(connection: Any, method: str, *args: Any) -> Any:
    """Call ``method`` of the driver connection under the pooled ``connection``, awaiting
    it on an async driver (``AdaptedConnection.run_async``) from SQLAlchemy's sync side."""
    run_async = getattr(connection.dbapi_connection, "run_async", None)
    if run_async is not None:
        return run_async(lambda driver: getattr(driver, method)(*args))
    return getattr(connection.driver_connection, method)(*args)
