"""Optional web framework integrations: one unit of work per request.

``dbsession.integrations.fastapi`` needs ``pip install 'sqlalchemy-dbsession[fastapi]'``,
``dbsession.integrations.flask`` needs ``pip install 'sqlalchemy-dbsession[flask]'``.
``import dbsession`` never imports this package or either framework.
"""
