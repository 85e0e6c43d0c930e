"""The HTTP API on --port: TGI's routes, the OpenAI-compatible ones, health, metrics, OpenAPI.

Built on FastAPI (Starlette) served by uvicorn inside the router's own event
loop, so HTTP handlers call the scheduler directly, exactly as the gRPC
servicer does. Around the routes, in order: the body limit (413 beyond
--payload-limit plus the margin for JSON framing, read before any parsing),
the API key (``Authorization: Bearer`` on every route but /health and
/metrics, 401 otherwise), CORS when --cors-allow-origin is set. Errors are
TGI's ``{"error", "error_type"}`` bodies (errors.py). The OpenAPI document is
at /api-doc/openapi.json and its page at /docs, where TGI serves them.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..serving import ApiError, ServingState
from ..validation import ValidationError
from . import openai, tgi
from .calls import EventSource
from .errors import error_body
from .schemas import (
    ChatCompletion,
    ChatRequest,
    CompatGenerateRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Info,
    ModelList,
    SimpleToken,
    StreamResponse,
    TokenizeRequest,
)

# What a body may carry besides its texts (parameters, JSON escapes) above --payload-limit.
BODY_MARGIN_BYTES = 1 << 20
# Seconds a client may take to send its request body (a slow sender holds a connection, nothing else).
BODY_READ_TIMEOUT_S = 60.0
# Routes an API key does not guard: orchestrators' probes and Prometheus.
OPEN_ROUTES = frozenset({"/health", "/metrics"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class HttpSettings:
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = 2_000_000
    max_best_of: int = 2
    max_connections: int = 1024


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind}, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: the body limit and the API key, before any route or parsing runs."""

    def __init__(self, app, settings: HttpSettings) -> None:
        self.app = app
        self.max_body = settings.payload_limit + BODY_MARGIN_BYTES
        self.api_key = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_ROUTES and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.api_key):
                why = "missing" if not given else "wrong"
                await _error(
                    401, f"Unauthorized: the Authorization header is {why}; send `Authorization: Bearer <api key>` "
                    "(the server runs with --api-key)", "authentication", {"WWW-Authenticate": "Bearer"},
                )(scope, receive, send)
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._too_large(scope, receive, send, int(length))
            return
        # Read the body here (chunked bodies have no length) and hand it on in one piece.
        chunks, size = [], 0
        try:
            async with asyncio.timeout(BODY_READ_TIMEOUT_S):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away before sending its body
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body:
                        await self._too_large(scope, receive, send, size)
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _error(408, f"the request body did not arrive within {BODY_READ_TIMEOUT_S:g} s", "timeout",
                         {"Connection": "close"})(scope, receive, send)
            return
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, size: int) -> None:
        limit = self.max_body - BODY_MARGIN_BYTES
        await _error(
            413, f"the request body has {size} bytes or more; --payload-limit allows {limit} bytes of text "
            f"(bodies up to {self.max_body} bytes)", "validation",
        )(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-sent events, each of which the client must take within --stream-write-timeout.

    A client that stops reading fills the connection's buffers and every later write waits; its
    generation is then cancelled (KV freed, admission returned, counted as stalled) and the
    connection closed, as GenerateStream does over gRPC.
    """

    def __init__(self, source: EventSource, write_timeout: float) -> None:
        super().__init__(source.events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.source = source
        self.write_timeout = write_timeout

    async def stream_response(self, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                try:
                    async with asyncio.timeout(self.write_timeout):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except TimeoutError:
                    self.source.call.stall(self.write_timeout)
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.source.events.aclose()


def _readable(err: RequestValidationError, content_type: str) -> str:
    """One line naming each field that did not parse and why."""
    problems = []
    for item in err.errors():
        if item.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({item.get('ctx', {}).get('error', 'decode error')})"
        if tuple(item.get("loc", ())) == ("body",) and "json" not in content_type:
            return (f"the request body must be a JSON object sent with `Content-Type: application/json` "
                    f"(got Content-Type {content_type or 'none'!r})")
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(problems) or "the request body is not valid"


def build_app(state: ServingState, settings: HttpSettings, *, is_serving: Callable[[], bool]) -> FastAPI:
    app = FastAPI(
        title="text-generation-server",
        version=state.version or "0",
        description="TGI's HTTP API and the OpenAI-compatible API of a text-generation-server router.",
        openapi_url="/api-doc/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    errors = {422: {"model": ErrorResponse}, 424: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
              503: {"model": ErrorResponse}}

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, err: RequestValidationError):
        api = "openai" if request.url.path.startswith("/v1/") else "http"
        state.metrics.request_failure.labels(err="validation", api=api).inc()
        return _error(422, _readable(err, request.headers.get("content-type", "")), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            return _error(404, f"no route {request.url.path}; see /docs for the API", "not_found")
        if err.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")
        return _error(err.status_code, str(err.detail), "http")

    async def run(api: str, work) -> Response:
        """Await one handler; its errors become TGI error bodies, its iterators event streams."""
        try:
            result = await work
        except (ValidationError, ApiError) as err:
            status, body = error_body(err)
            # Counted here as the gRPC servicer counts them: a refused request (validation) and an
            # unavailable server; admission (conc_limit) and generation failures (generate) are
            # counted where they happen.
            if isinstance(err, ValidationError):
                state.metrics.request_failure.labels(err="validation", api=api).inc()
                logger.warning(f"Rejected HTTP request: {err}")
            elif status == 503:
                state.metrics.request_failure.labels(err="unavailable", api=api).inc()
            return JSONResponse(body, status_code=status)
        except Exception as err:
            state.metrics.request_failure.labels(err="internal", api=api).inc()
            status, body = error_body(err)
            return JSONResponse(body, status_code=status)
        if isinstance(result, dict | list):
            return JSONResponse(result)
        return EventStream(result, state.limits.stream_write_timeout)

    # ---- TGI --------------------------------------------------------------------------------

    @app.post("/generate", response_model=GenerateResponse, responses=errors, tags=["Text Generation Inference"])
    async def generate(request: Request, body: GenerateRequest):
        """Generate tokens for one prompt."""
        return await run(tgi.API, tgi.generate(state, request, body, settings.max_best_of))

    @app.post("/generate_stream", response_model=StreamResponse, responses=errors,
              tags=["Text Generation Inference"])
    async def generate_stream(request: Request, body: GenerateRequest):
        """Generate tokens for one prompt as server-sent events; the last carries generated_text and details."""
        return await run(tgi.API, tgi.generate_stream(state, request, body))

    @app.post("/", response_model=list[GenerateResponse], responses=errors, tags=["Text Generation Inference"])
    @app.post("/invocations", response_model=list[GenerateResponse], responses=errors,
              tags=["Text Generation Inference"])
    async def compat_generate(request: Request, body: CompatGenerateRequest):
        """/generate (its answer in a one-item list, as TGI's), or /generate_stream when `stream` is true
        (also at /invocations, the route SageMaker endpoints call, as TGI's)."""
        if body.stream:
            return await run(tgi.API, tgi.generate_stream(state, request, body))
        return await run(tgi.API, _listed(tgi.generate(state, request, body, settings.max_best_of)))

    @app.post("/tokenize", response_model=list[SimpleToken], responses=errors, tags=["Text Generation Inference"])
    async def tokenize(request: Request, body: TokenizeRequest):
        """The prompt's tokens with their character spans."""
        return await run(tgi.API, _tokenize(state, body))

    @app.get("/info", response_model=Info, tags=["Text Generation Inference"])
    async def info():
        """The served model and the router's limits."""
        return await run(tgi.API, _info(state, settings))

    @app.get("/health", tags=["Text Generation Inference"], responses={503: {"model": ErrorResponse}})
    async def health():
        """200 when the model is ready to generate, 503 while loading, draining or after a shard failure."""
        if is_serving():
            return Response(status_code=200)
        return _error(503, "not serving: the model is loading, the server is draining or a shard failed",
                      "unhealthy")

    @app.get("/metrics", tags=["Text Generation Inference"], response_class=Response)
    async def metrics():
        """Prometheus metrics."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    # ---- OpenAI -----------------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=errors, tags=["OpenAI"])
    async def chat_completions(request: Request, body: ChatRequest):
        """A chat reply, rendered with the model's chat template (streamed as server-sent events when `stream`)."""
        return await run(openai.API, openai.chat_completions(state, request, body))

    @app.post("/v1/completions", response_model=Completion, responses=errors, tags=["OpenAI"])
    async def completions(request: Request, body: CompletionRequest):
        """Plain completion of one prompt or a list of them (at most --max-client-batch-size)."""
        return await run(openai.API, openai.completions(state, request, body))

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"])
    async def models():
        """The one served model."""
        return await run(openai.API, _ready(state, openai.models(state)))

    outer = _Guard(app, settings)
    if settings.cors_allow_origin:
        outer = CORSMiddleware(
            outer, allow_origins=list(settings.cors_allow_origin), allow_methods=["GET", "POST"],
            allow_headers=["content-type", "authorization"],
        )
    app.state.asgi = outer
    return app


async def _listed(work) -> list:
    return [await work]


async def _ready(state: ServingState, value):
    state.check_available()
    return value


async def _info(state: ServingState, settings: HttpSettings) -> dict:
    state.check_available()
    limits = state.limits
    return {
        "model_id": state.model_id,
        "model_sha": None,
        "model_dtype": state.model_dtype,
        "model_device_type": state.model_device_type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": limits.max_concurrent_requests,
        "max_best_of": settings.max_best_of,
        "max_stop_sequences": limits.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "validation_workers": 2,
        "max_client_batch_size": state.max_client_batch_size,
        "router": "text-generation-router",
        "version": state.version,
        "sha": None,
        "docker_label": None,
    }


async def _tokenize(state: ServingState, body: TokenizeRequest) -> list[dict]:
    state.check_available()
    state.check_payload([body.inputs])
    state.metrics.tokenize_request_count.inc()
    with state.admit(1, api=tgi.API):
        encoding = await state.tokenizer.encode_async(
            body.inputs, with_offsets=True, add_special_tokens=body.add_special_tokens
        )
    truncate = body.parameters.truncate if body.parameters is not None and body.parameters.truncate else 0
    encoding = encoding.keep_last(truncate)
    state.metrics.tokenize_request_tokens.observe(len(encoding.ids))
    return [
        {"id": i, "text": body.inputs[start:stop], "start": start, "stop": stop}
        for i, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True)
    ]


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (the first address the name resolves to)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] in ("::", "::0"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer:
    """uvicorn serving :func:`build_app` on the running event loop (no signal handlers of its own)."""

    def __init__(self, host: str, port: int, app: FastAPI, *, max_connections: int = 1024) -> None:
        self._max_connections = max_connections
        self._host = host
        self._requested_port = port
        self._app = app
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._loop_task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Listen (OSError when the port cannot be opened) and serve."""
        self._socket = _listen(self._host, self._requested_port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self._app.state.asgi,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=75,
            timeout_graceful_shutdown=2,
            # --max-connections bounds this port too: beyond it uvicorn answers 503 at once.
            limit_concurrency=self._max_connections,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        self._server = server
        self._loop_task = asyncio.ensure_future(server.main_loop())
        logger.info(f"Serving HTTP (TGI routes, /v1 OpenAI-compatible routes, /health, /metrics, /docs) on "
                    f"{self._host}:{self.port}")

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            if self._socket is not None:
                self._socket.close()
            return
        server.should_exit = True
        if self._loop_task is not None:
            await self._loop_task
        await server.shutdown(sockets=[self._socket])

