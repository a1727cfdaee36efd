"""Revision files of the store example, loaded by Alembic."""
