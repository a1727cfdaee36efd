"""dbsession: a thin, opinionated unit of work over SQLAlchemy 2.x.

``with session_scope() as session:`` gives a real SQLAlchemy Session; leaving the
block commits everything, any exception rolls everything back.
"""

from ._base import NAMING_CONVENTION as NAMING_CONVENTION
from ._base import Base as Base
from ._config import mask_url as mask_url
from ._context import current_session as current_session
from ._context import on_commit as on_commit
from ._errors import AlreadyInitializedError as AlreadyInitializedError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import DatabaseUnreachableError as DatabaseUnreachableError
from ._errors import DbSessionError as DbSessionError
from ._errors import InvalidURLError as InvalidURLError
from ._errors import MigrationError as MigrationError
from ._errors import MigrationsNotFoundError as MigrationsNotFoundError
from ._errors import MissingDriverError as MissingDriverError
from ._errors import NoActiveScopeError as NoActiveScopeError
from ._errors import ReadOnlyError as ReadOnlyError
from ._errors import RetryExhaustedError as RetryExhaustedError
from ._errors import SchemaNotAtHeadError as SchemaNotAtHeadError
from ._errors import ScopeError as ScopeError
from ._errors import SQLitePathError as SQLitePathError
from ._errors import UnknownDialectError as UnknownDialectError
from ._errors import UnknownRevisionError as UnknownRevisionError
from ._errors import UnsupportedIsolationLevelError as UnsupportedIsolationLevelError
from ._factory import DbSessionFactory as DbSessionFactory
from ._factory import create_session as create_session
from ._factory import run_in_transaction as run_in_transaction
from ._factory import session_scope as session_scope
from ._factory import transactional as transactional
from ._version import __version__ as __version__

__all__ = [
    "__version__",
    "NAMING_CONVENTION",
    "AlreadyInitializedError",
    "Base",
    "ConfigurationError",
    "DatabaseUnreachableError",
    "DbSessionError",
    "DbSessionFactory",
    "InvalidURLError",
    "MigrationError",
    "MigrationsNotFoundError",
    "MissingDriverError",
    "NoActiveScopeError",
    "ReadOnlyError",
    "RetryExhaustedError",
    "SQLitePathError",
    "ScopeError",
    "UnknownDialectError",
    "UnsupportedIsolationLevelError",
    "SchemaNotAtHeadError",
    "UnknownRevisionError",
    "create_session",
    "current_session",
    "mask_url",
    "on_commit",
    "run_in_transaction",
    "session_scope",
    "transactional",
]
