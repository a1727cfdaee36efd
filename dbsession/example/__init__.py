"""The store example: customers, suppliers and orders (``python -m dbsession.example``).

``import dbsession`` never imports this package, so these tables are only
registered in ``dbsession.Base.metadata`` by code that imports them.
"""
