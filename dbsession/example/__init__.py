"""The store example: customers, suppliers and orders (``python -m dbsession.example``).

Its models have their own declarative base (``dbsession.example.models.Base``) and its
Alembic revisions ship inside the package (``dbsession/example/migrations``), so the
example runs from an installed wheel in any folder and never touches an app's
metadata or migrations. ``import dbsession`` never imports this package.
"""
