"""The OpenAI-compatible HTTP server (`mixlocal serve`, `python -m mixlocal.engine.server`).

app.py: routes, the service and the command line; requests.py: request bodies checked; prompts.py: prompt ids and
context shift; responses.py: response bodies and SSE framing; worker.py: the one thread that runs the model.
"""
from __future__ import annotations

from .app import SEED_MODEL_ID, add_serve_arguments, create_app, main, run_serve

__all__ = ["SEED_MODEL_ID", "add_serve_arguments", "create_app", "main", "run_serve"]
