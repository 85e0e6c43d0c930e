"""The HTTP API: TGI's routes and the OpenAI-compatible ones (app.py), on the shared request path."""

from .app import HttpServer, HttpSettings, build_app

__all__ = ["HttpServer", "HttpSettings", "build_app"]
