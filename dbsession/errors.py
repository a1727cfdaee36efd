"""Every exception dbsession raises, rooted in ``DbSessionError`` (the tree is in the
docstring of ``dbsession._errors``). The ones callers usually catch separately are also
importable from ``dbsession`` itself."""

from ._errors import AlreadyInitializedError as AlreadyInitializedError
from ._errors import BulkInsertError as BulkInsertError
from ._errors import ClusterUnavailableError as ClusterUnavailableError
from ._errors import CommitOutcomeUnknownError as CommitOutcomeUnknownError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import ConnectionLostError as ConnectionLostError
from ._errors import DatabaseBlockedError as DatabaseBlockedError
from ._errors import DatabaseReadOnlyError as DatabaseReadOnlyError
from ._errors import DatabaseUnreachableError as DatabaseUnreachableError
from ._errors import DbSessionError as DbSessionError
from ._errors import InvalidURLError as InvalidURLError
from ._errors import MigrationBlockedError as MigrationBlockedError
from ._errors import MigrationError as MigrationError
from ._errors import MigrationLockTimeoutError as MigrationLockTimeoutError
from ._errors import MigrationsNotFoundError as MigrationsNotFoundError
from ._errors import MissingDriverError as MissingDriverError
from ._errors import NeedsRollbackError as NeedsRollbackError
from ._errors import NoActiveScopeError as NoActiveScopeError
from ._errors import NotInitializedError as NotInitializedError
from ._errors import PoolExhaustedError as PoolExhaustedError
from ._errors import ReadOnlyError as ReadOnlyError
from ._errors import RemovedAPIError as RemovedAPIError
from ._errors import ReplicaLagError as ReplicaLagError
from ._errors import RetryExhaustedError as RetryExhaustedError
from ._errors import SchemaNotAtHeadError as SchemaNotAtHeadError
from ._errors import ScopeError as ScopeError
from ._errors import ScopeTimeoutError as ScopeTimeoutError
from ._errors import SharedConnectionError as SharedConnectionError
from ._errors import SQLitePathError as SQLitePathError
from ._errors import SQLiteWriteLockTimeoutError as SQLiteWriteLockTimeoutError
from ._errors import TransactionAbortedError as TransactionAbortedError
from ._errors import UnknownDialectError as UnknownDialectError
from ._errors import UnknownRevisionError as UnknownRevisionError
from ._errors import UnsupportedIsolationLevelError as UnsupportedIsolationLevelError

__all__ = [
    "AlreadyInitializedError",
    "BulkInsertError",
    "ClusterUnavailableError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConnectionLostError",
    "DatabaseBlockedError",
    "DatabaseReadOnlyError",
    "DatabaseUnreachableError",
    "DbSessionError",
    "InvalidURLError",
    "MigrationBlockedError",
    "MigrationError",
    "MigrationLockTimeoutError",
    "MigrationsNotFoundError",
    "MissingDriverError",
    "NeedsRollbackError",
    "NoActiveScopeError",
    "NotInitializedError",
    "PoolExhaustedError",
    "ReadOnlyError",
    "RemovedAPIError",
    "ReplicaLagError",
    "RetryExhaustedError",
    "SQLitePathError",
    "SQLiteWriteLockTimeoutError",
    "SchemaNotAtHeadError",
    "ScopeError",
    "ScopeTimeoutError",
    "SharedConnectionError",
    "TransactionAbortedError",
    "UnknownDialectError",
    "UnknownRevisionError",
    "UnsupportedIsolationLevelError",
]
