"""The declarative base every model of a dbsession app derives from."""

from __future__ import annotations

from typing import ClassVar

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

#: Constraint and index names that come out the same on every backend, so that
#: Alembic migrations can name what they alter or drop.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base whose MetaData applies :data:`NAMING_CONVENTION`.

    An app with its own base class can reuse the convention:
    ``metadata = MetaData(naming_convention=NAMING_CONVENTION)``.
    """

    metadata: ClassVar[MetaData] = MetaData(naming_convention=NAMING_CONVENTION)
