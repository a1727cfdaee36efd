"""The store API on Flask.

Run it with ``python -m examples.flask_app``, or ``flask --app examples.flask_app run``.
"""

from .app import create_app

__all__ = ["create_app"]
