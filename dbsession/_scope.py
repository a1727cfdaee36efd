"""The unit of work: one session, committed on success, rolled back on any exception."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

logger = logging.getLogger("dbsession")


@contextmanager
def unit_of_work(make_session: Callable[[], Session]) -> Iterator[Session]:
    """Yield a new session; commit when the block ends, roll back on any exception, always close.

    Any ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``)
    rolls back too, and the original exception is re-raised unchanged. If the
    commit itself fails, the transaction is rolled back and the commit's error raised.
    """
    session = make_session()
    try:
        yield session
        session.commit()
    except BaseException:
        rollback_quietly(session)
        raise
    finally:
        session.close()


def rollback_quietly(session: Session) -> None:
    """Roll back without letting a failing rollback hide the exception that caused it."""
    try:
        session.rollback()
    except Exception:
        logger.warning("dbsession: rollback failed after an error in the scope", exc_info=True)
