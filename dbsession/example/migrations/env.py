"""Alembic environment: dbsession supplies the URL, metadata and migration lock."""

from dbsession.migrations import run_env

run_env()
