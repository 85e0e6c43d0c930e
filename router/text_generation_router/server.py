"""Wiring: ports, shards, warmup, scheduler, and an orderly stop.

Start-up order matters to orchestrators: the gRPC port opens first with
health NOT_SERVING (so probes get an answer while shards warm up), then the
router connects to the shards, sizes its limits from Info and Warmup, starts
the batching loop and only then reports SERVING.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loguru import logger
from text_generation_server.pb.fmaas import generation_pb2_grpc
from text_generation_server.pb.generate.v1 import generate_pb2
from text_generation_server.utils.heap import freeze_startup_objects

from .config import RouterArgs, resolve_limits, resolve_sequence_limits, tokenizer_path
from .health import GENERATION_SERVICE, HealthState
from .http import HttpServer, HttpSettings, build_app
from .memory import limit_arenas, trim_when_idle
from .metrics import RouterMetrics
from .scheduler import Scheduler
from .servicer import GenerationServicer
from .serving import ServingState
from .shard_client import ShardClient
from .tls import server_credentials
from .tokenization import Tokenizer
from .validation import Validator
from .wire import UndecodableRequestInterceptor

try:
    VERSION = importlib.metadata.version("text-generation-server")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0"
# What a call may carry besides its texts (parameters, stop sequences, framing) above --payload-limit.
RECEIVE_MARGIN_BYTES = 1 << 20
# Calls one client connection may have open at once (admission limits the server as a whole).
MAX_STREAMS_PER_CONNECTION = 1000
IDLE_CONNECTION_MS = 30 * 60 * 1000


def _server_options(payload_limit: int, max_connections: int) -> list[tuple[str, int]]:
    receive = payload_limit + RECEIVE_MARGIN_BYTES
    return [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        # A message over --payload-limit by more than the margin is refused by gRPC from its length
        # prefix (RESOURCE_EXHAUSTED), before it is read: a 48 MiB text read and refused later cost
        # ~150 MiB of buffers and copies for the moment, per concurrent call.
        ("grpc.max_receive_message_length", receive),
        # gRPC sets SO_REUSEPORT by default, so a second router on the same port would share it
        # (each getting part of the connections) instead of being refused.
        ("grpc.so_reuseport", 0),
        # Connections: at most --max-connections at once (refused at connect beyond it), each
        # with at most MAX_STREAMS_PER_CONNECTION calls open. Keepalive finds peers that vanished
        # without closing (a crashed client, a dropped NAT entry): pinged after a minute of
        # silence, closed 20 s later without an answer. Connections without calls are closed
        # after IDLE_CONNECTION_MS (clients reconnect by themselves). Clients may ping at most
        # every 10 s; a client that pings faster twice is disconnected (ping flood).
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
    ]


class BindError(RuntimeError):
    """A listening port could not be opened; the message names it."""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def warmup_batch(max_input_tokens: int, max_prefill_tokens: int, max_total_tokens: int, vocab_size: int) -> generate_pb2.Batch:
    """A prefill batch as large as the router will ever send: inputs of max_input_tokens up to the prefill budget."""
    requests = []
    remaining = max_prefill_tokens
    vocab = max(2, vocab_size)
    while remaining > 0:
        length = min(max_input_tokens, remaining)
        offset = len(requests) * max_input_tokens
        requests.append(
            generate_pb2.Request(
                id=len(requests),
                input_ids=[1 + (offset + k) % (vocab - 1) for k in range(length)],
                sampling=generate_pb2.SamplingParameters(
                    do_sample=False, temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0
                ),
                stopping=generate_pb2.StoppingParameters(max_new_tokens=max(1, max_total_tokens - length)),
            )
        )
        remaining -= length
    return generate_pb2.Batch(id=0, requests=requests)


class Router:
    """The router process's components, started and stopped together."""

    def __init__(self, args: RouterArgs) -> None:
        self.args = args
        self.metrics = RouterMetrics()
        self.health = HealthState()
        self.state: ServingState | None = None
        self.tokenizer: Tokenizer | None = None
        self.client: ShardClient | None = None
        self.scheduler: Scheduler | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.fatal = asyncio.Event()
        self.fatal_message: str | None = None
        self._grpc_server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._background: set[asyncio.Task] = set()
        self._hurry = asyncio.Event()

    async def start(self) -> None:
        """Bind ports (NOT_SERVING), connect and warm up the shards, then report SERVING.

        Raises ConfigError, TokenizerLoadError, ShardConnectError, ShardError or BindError.
        """
        args = self.args
        limit_arenas()
        self.tokenizer = Tokenizer.load(tokenizer_path(args))
        self.state = ServingState(
            tokenizer=self.tokenizer, metrics=self.metrics, model_id=args.model_id or "",
            max_client_batch_size=args.max_client_batch_size, version=VERSION, started_at=int(time.time()),
        )
        state = self.state
        self._background.add(asyncio.ensure_future(trim_when_idle(lambda: state.in_flight == 0)))
        await self._start_grpc()
        settings = HttpSettings(
            api_key=args.api_key, cors_allow_origin=args.cors_allow_origin, payload_limit=args.payload_limit,
            max_best_of=args.max_best_of, max_connections=args.max_connections,
        )
        app = build_app(self.state, settings, is_serving=lambda: self.health.serving)
        self._http = HttpServer(args.hostname, args.port, app, max_connections=args.max_connections)
        try:
            await self._http.start()
        except OSError as err:
            raise BindError(f"cannot listen for HTTP on {_address(args.hostname, args.port)}: {err}") from None
        self.http_port = self._http.port

        self.client = await ShardClient.connect(args.shard_uds_path, args.shard_connect_timeout)
        info = await self.client.info(ready_timeout=max(1.0, args.shard_connect_timeout))
        logger.info(
            f"Model {info.model_id or args.model_id}: {info.architecture}, {info.dtype} on {info.device_type}, "
            f"world size {info.world_size}, max_position_embeddings {info.max_position_embeddings}, "
            f"vocab {info.vocab_size}, quantize {info.quantize or 'none'}, kernel {info.kernel or 'default'}"
        )
        state.model_id = args.model_id or info.model_id or state.model_id
        state.model_dtype, state.model_device_type = info.dtype, info.device_type
        max_input, max_total, max_prefill = resolve_sequence_limits(args, info.max_position_embeddings)
        await self.client.clear_cache()
        warmup_start = time.monotonic()
        logger.info(f"Warming up the shards with a {max_prefill}-token prefill")
        warm = await self.client.warmup(
            generate_pb2.WarmupRequest(
                batch=warmup_batch(max_input, max_prefill, max_total, info.vocab_size or self.tokenizer.vocab_size),
                max_input_tokens=max_input,
                max_prefill_tokens=max_prefill,
                max_total_tokens=max_total,
                max_batch_total_tokens=args.max_batch_total_tokens or 0,
            )
        )
        await self.client.clear_cache()
        limits = resolve_limits(
            args,
            max_input_tokens=max_input,
            max_total_tokens=max_total,
            max_batch_prefill_tokens=max_prefill,
            supported_total_tokens=warm.max_supported_total_tokens,
            block_size=warm.block_size or info.block_size or 1,
        )
        logger.info(
            f"Warmup done in {time.monotonic() - warmup_start:.1f} s: KV capacity {warm.max_supported_total_tokens} "
            f"tokens ({warm.num_blocks} blocks of {warm.block_size}); limits: max_input_tokens "
            f"{limits.max_input_tokens}, max_total_tokens {limits.max_total_tokens}, max_batch_prefill_tokens "
            f"{limits.max_batch_prefill_tokens}, max_batch_total_tokens {limits.max_batch_total_tokens} "
            f"({'from --max-batch-total-tokens' if args.max_batch_total_tokens else 'from the KV cache capacity'}), "
            f"max_new_tokens {limits.max_new_tokens}"
        )
        self.scheduler = Scheduler(self.client, self.tokenizer, limits, self.metrics, on_fatal=self._on_fatal)
        self.scheduler.start()
        self.state.limits = limits
        self.state.validator = Validator(limits, self.tokenizer, model_vocab_size=info.vocab_size)
        self.state.scheduler = self.scheduler
        self.client.step_timeout = args.shard_step_timeout
        self.client.watch(self._on_shard_lost)
        # Everything built so far lives as long as the router: out of the cyclic collector's way.
        frozen = freeze_startup_objects()
        logger.debug(f"{frozen} start-up objects exempt from garbage collection")
        await self.health.set_serving(True)
        logger.info(f"Serving {GENERATION_SERVICE} on {_address(args.hostname, self.grpc_port)}")

    async def _start_grpc(self) -> None:
        args = self.args
        server = grpc.aio.server(
            options=_server_options(args.payload_limit, args.max_connections), interceptors=[UndecodableRequestInterceptor()]
        )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self.state), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            [GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        await self.health.set_serving(False)
        address = _address(args.hostname, args.grpc_port)
        tls = args.tls
        try:
            if tls is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, server_credentials(tls))
        except RuntimeError as err:
            raise BindError(f"cannot listen for gRPC on {address}: {err}") from None
        if self.grpc_port == 0:
            raise BindError(f"cannot listen for gRPC on {address} (address in use or not local)")
        await server.start()
        self._grpc_server = server
        security = "plaintext" if tls is None else "TLS, client certificates required" if tls.mutual else "TLS"
        logger.info(
            f"gRPC port {_address(args.hostname, self.grpc_port)} open ({security}; health NOT_SERVING until warm)"
        )

    async def _on_shard_lost(self, message: str) -> None:
        if self.scheduler is not None:
            self.scheduler.fail_all(message)
        else:
            self._on_fatal(message)

    def _on_fatal(self, message: str) -> None:
        if self.fatal.is_set():
            return
        self.fatal_message = message
        self.fatal.set()
        task = asyncio.ensure_future(self.health.set_serving(False))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` s, cancel the rest, stop."""
        if self.state is not None:
            self.state.draining = True
        await self.health.set_serving(False)
        in_flight = self.state.in_flight if self.state is not None else 0
        logger.info(f"Draining: no new requests; {in_flight} in flight get up to {timeout:.0f} s to finish")
        deadline = time.monotonic() + timeout
        while (
            self.state is not None
            and self.state.in_flight > 0
            and time.monotonic() < deadline
            and not self._hurry.is_set()
        ):
            await asyncio.sleep(0.05)
        if self.state is not None and self.state.in_flight > 0 and self.scheduler is not None:
            logger.warning(f"Cancelling {self.state.in_flight} request(s) still in flight")
            self.scheduler.cancel_all()
            end = time.monotonic() + 2.0
            while self.state.in_flight > 0 and time.monotonic() < end:
                await asyncio.sleep(0.05)
        await self.stop()

    def hurry(self) -> None:
        """End a drain now: in-flight requests are cancelled instead of waited for."""
        self._hurry.set()

    async def stop(self) -> None:
        """Close everything this router opened (idempotent)."""
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=1.0)
            self._grpc_server = None
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.tokenizer is not None:
            self.tokenizer.close()
