"""The store API on FastAPI, sync path operations (``python -m examples.fastapi_app``)."""
