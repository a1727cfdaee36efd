"""The installed distribution's version, read from its metadata (pyproject.toml is the source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("dbsession")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
