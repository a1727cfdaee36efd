"""dbsession: a thin, opinionated unit of work over SQLAlchemy 2.x.

``with session_scope() as session:`` gives a real SQLAlchemy Session; leaving the
block commits everything, any exception rolls everything back.

Every exception is importable from ``dbsession.errors``; the ones callers usually
catch separately are also here.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import errors as _public_errors
from ._base import NAMING_CONVENTION as NAMING_CONVENTION
from ._base import Base as Base
from ._bulk import bulk_insert as bulk_insert
from ._config import Timeouts as Timeouts
from ._config import mask_url as mask_url
from ._context import current_session as current_session
from ._context import on_commit as on_commit
from ._errors import ConfigurationError as ConfigurationError
from ._errors import DatabaseReadOnlyError as DatabaseReadOnlyError
from ._errors import DatabaseUnreachableError as DatabaseUnreachableError
from ._errors import DbSessionError as DbSessionError
from ._errors import NeedsRollbackError as NeedsRollbackError
from ._errors import NoActiveScopeError as NoActiveScopeError
from ._errors import ReadOnlyError as ReadOnlyError
from ._errors import RetryExhaustedError as RetryExhaustedError
from ._errors import SchemaNotAtHeadError as SchemaNotAtHeadError
from ._errors import TransactionAbortedError as TransactionAbortedError
from ._factory import DbSessionFactory as DbSessionFactory
from ._factory import create_session as create_session
from ._factory import default_factory as default_factory
from ._factory import run_in_transaction as run_in_transaction
from ._factory import session_scope as session_scope
from ._factory import transactional as transactional
from ._retry import RetryPolicy as RetryPolicy
from ._version import __version__ as __version__

__all__ = [
    "__version__",
    "NAMING_CONVENTION",
    "Base",
    "ConfigurationError",
    "DatabaseReadOnlyError",
    "DatabaseUnreachableError",
    "DbSessionError",
    "DbSessionFactory",
    "NeedsRollbackError",
    "NoActiveScopeError",
    "ReadOnlyError",
    "RetryExhaustedError",
    "RetryPolicy",
    "SchemaNotAtHeadError",
    "Timeouts",
    "TransactionAbortedError",
    "create_session",
    "current_session",
    "bulk_insert",
    "default_factory",
    "mask_url",
    "on_commit",
    "run_in_transaction",
    "session_scope",
    "transactional",
]


def __getattr__(name: str) -> Any:
    """The exceptions that moved to ``dbsession.errors`` still resolve here, with a warning."""
    if name in _public_errors.__all__:
        warnings.warn(
            f"dbsession.{name} moved to dbsession.errors.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_public_errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
