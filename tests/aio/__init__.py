"""Tests of dbsession.asyncio, on every backend."""
