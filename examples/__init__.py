"""Web examples over the store models: examples.fastapi_app and examples.flask_app.

Run from the repository root (``python -m examples.fastapi_app``); not installed
with the package.
"""
