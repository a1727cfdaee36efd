"""The installed distribution's version, read from its metadata (pyproject.toml is the source).

The distribution is ``sqlalchemy-dbsession``; a service made from the template
(docs/template.md) ships this package under its own name, whose version is used then.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, packages_distributions, version

DISTRIBUTION = "sqlalchemy-dbsession"


def _version() -> str:
    for name in (DISTRIBUTION, *packages_distributions().get("dbsession", [])):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "0+unknown"  # imported from a source tree that was never installed


__version__: str = _version()
