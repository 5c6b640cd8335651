"""The steering server: an OpenAI-compatible HTTP server with per-request interventions and continuous batching.

``requests.py`` parses and validates a request body into frozen dataclasses, ``scheduler.py`` is the
continuous-batching engine on one model thread, ``app.py`` the HTTP layer (FastAPI + uvicorn, SSE). See
``docs/steering.md`` ("Serving with interventions").
"""
