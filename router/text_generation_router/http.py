"""A minimal HTTP/1.1 endpoint on --port: GET /health and GET /metrics.

Only two read-only routes, so a few dozen lines of asyncio streams serve
them on the router's own event loop without a web framework. One request
per connection (``Connection: close``), which is what probes and Prometheus
scrapers do anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from loguru import logger

from .metrics import RouterMetrics

_MAX_HEADER_LINES = 100
_READ_TIMEOUT_S = 10.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}


class HttpServer:
    """Serves /health (200 when serving, 503 otherwise) and /metrics (Prometheus text)."""

    def __init__(self, host: str, port: int, *, is_serving: Callable[[], bool], metrics: RouterMetrics) -> None:
        self._host = host
        self._requested_port = port
        self._is_serving = is_serving
        self._metrics = metrics
        self._server: asyncio.base_events.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._requested_port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info(f"Serving HTTP /health and /metrics on {self._host}:{self.port}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT_S)
            for _ in range(_MAX_HEADER_LINES):
                line = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT_S)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2:
                await self._respond(writer, 400, b"bad request\n", "text/plain", head=False)
                return
            method, target = parts[0].upper(), parts[1].split("?", 1)[0]
            status, body, content_type = self._route(method, target)
            await self._respond(writer, status, body, content_type, head=method == "HEAD")
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[int, bytes, str]:
        if path not in ("/health", "/metrics"):
            return 404, b"not found: try /health or /metrics\n", "text/plain"
        if method not in ("GET", "HEAD"):
            return 405, b"only GET is allowed\n", "text/plain"
        if path == "/health":
            if self._is_serving():
                return 200, b"ok\n", "text/plain"
            return 503, b"not serving\n", "text/plain"
        return 200, self._metrics.render(), self._metrics.content_type

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, *, head: bool) -> None:
        headers = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(headers.encode("latin-1") + (b"" if head else body))
        await writer.drain()
