"""Models of the store example: an order belongs to a customer and a supplier.

They derive from the example's own declarative base, not from ``dbsession.Base``, so an
app's ``dbsession.Base.metadata`` never contains these tables, whatever it imports.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import ClassVar

from sqlalchemy import DateTime, ForeignKey, MetaData, Numeric, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from dbsession import NAMING_CONVENTION


class Base(DeclarativeBase):
    """The example's own declarative base (the same naming convention as ``dbsession.Base``)."""

    metadata: ClassVar[MetaData] = MetaData(naming_convention=NAMING_CONVENTION)


class Customer(Base):
    """Somebody who places orders."""

    __tablename__ = "customer"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Supplier(Base):
    """A company whose goods are ordered."""

    __tablename__ = "supplier"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    orders: Mapped[list[Order]] = relationship(back_populates="supplier")


class Order(Base):
    """One order of a customer from a supplier."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customer.id"), index=True)
    supplier_id: Mapped[int] = mapped_column(ForeignKey("supplier.id"), index=True)
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    placed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    customer: Mapped[Customer] = relationship(back_populates="orders")
    supplier: Mapped[Supplier] = relationship(back_populates="orders")
