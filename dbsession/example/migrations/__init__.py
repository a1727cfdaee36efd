"""The store example's Alembic revisions (data for Alembic; importing this package runs nothing)."""
