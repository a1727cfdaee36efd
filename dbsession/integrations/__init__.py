"""Optional web framework integrations: one unit of work per request.

``dbsession.integrations.fastapi`` needs ``pip install 'dbsession[fastapi]'``,
``dbsession.integrations.flask`` needs ``pip install 'dbsession[flask]'``.
``import dbsession`` never imports this package or either framework.
"""
