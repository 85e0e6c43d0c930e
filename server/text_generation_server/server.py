"""The shard's gRPC server: generate.v1.TextGenerationService on ``unix://{uds_path}-{rank}``.

Model work runs on one worker thread, in the order the RPCs arrive, which is
what keeps the ranks in lockstep; the event loop stays free to answer Health
and Info while a long prefill runs. The same thread loads the model: with
OpenMP, a second thread running parallel torch work adds a second team of
threads, and once a process's OpenMP threads outnumber its cores they stop
spinning between parallel regions, which made a 4-bit decode step 1.8x slower.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import queue
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from loguru import logger

from text_generation_server.engine.generator import Generator
from text_generation_server.interceptor import ExceptionInterceptor
from text_generation_server.pb.generate.v1 import generate_pb2, generate_pb2_grpc
from text_generation_server.utils.heap import freeze_startup_objects
from text_generation_server.utils.sockets import clear_stale_socket, shard_socket, shard_url

T = TypeVar("T")

# Seconds in-flight RPCs get to finish once the shard is asked to stop.
STOP_GRACE_S = 3.0


class ModelWorker:
    """One daemon thread running model calls in submission order, on ``device`` (a GPU shard's
    CUDA device is made current on that thread).

    A daemon thread, so a shard told to stop can exit even while a forward
    waits on a peer that is gone.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        # (future, function, args) per call; None stops the thread.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.device = device
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()
        self.pending = 0

    def _loop(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            # CUDA's current device is per thread: loading, warm-up and every forward run here,
            # and Triton launches on the current device.
            torch.cuda.set_device(self.device)
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # handed to the awaiting RPC
                future.set_exception(error)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and wait for it (outside the event loop)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args))
        return future.result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Queue ``fn(*args)`` and await its result.

        A call runs even if its RPC is cancelled meanwhile: the other ranks
        run theirs, and skipping one would break the lockstep.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.pending += 1
        try:
            self._queue.put((future, fn, args))
            return await asyncio.shield(asyncio.wrap_future(future))
        finally:
            self.pending -= 1

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._queue.put(None)


class ShardServicer(generate_pb2_grpc.TextGenerationServiceServicer):
    """The internal API over one rank's :class:`Generator`; errors map in the interceptor."""

    def __init__(self, generator: Generator, urls: list[str], worker: ModelWorker) -> None:
        self.generator = generator
        self.urls = urls
        self.worker = worker

    async def Info(self, request, context):
        return self.generator.info()

    async def Health(self, request, context):
        if not self.worker.alive:
            raise RuntimeError("the model worker thread has stopped")
        # A busy worker is a live one; an idle one proves the model still runs.
        if self.worker.pending == 0:
            await self.worker.run(self.generator.health)
        return generate_pb2.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        return generate_pb2.ServiceDiscoveryResponse(urls=self.urls)

    async def _run_with_usage(self, fn: Callable[..., T], *args: Any) -> tuple[T, generate_pb2.KvCacheUsage]:
        """``fn(*args)`` on the model worker, with the KV cache usage right after it."""

        def call() -> tuple[T, generate_pb2.KvCacheUsage]:
            return fn(*args), self.generator.kv_usage()

        return await self.worker.run(call)

    async def ClearCache(self, request, context):
        batch_id = request.id if request.HasField("id") else None
        _, usage = await self._run_with_usage(self.generator.clear_cache, batch_id)
        return generate_pb2.ClearCacheResponse(kv_cache=usage)

    async def FilterBatch(self, request, context):
        batch, usage = await self._run_with_usage(
            self.generator.filter_batch, request.batch_id, list(request.request_ids)
        )
        return generate_pb2.FilterBatchResponse(batch=batch, kv_cache=usage)

    async def Warmup(self, request, context):
        response = await self.worker.run(self.generator.warmup, request)
        # Everything built so far lives as long as the shard: out of the cyclic collector's way.
        frozen = freeze_startup_objects()
        logger.debug(f"{frozen} start-up objects exempt from garbage collection")
        return response

    async def Prefill(self, request, context):
        (generations, batch, timings), usage = await self._run_with_usage(
            self.generator.prefill, request.batch, request.chunk_tokens
        )
        response = generate_pb2.PrefillResponse(
            generations=generations, timings=timings, kv_cache=usage
        )
        if batch is not None:
            response.batch.CopyFrom(batch)
        return response

    async def Decode(self, request, context):
        (generations, batch, timings), usage = await self._run_with_usage(
            self.generator.decode, list(request.batches), request.chunk_tokens
        )
        response = generate_pb2.DecodeResponse(
            generations=generations, timings=timings, kv_cache=usage
        )
        if batch is not None:
            response.batch.CopyFrom(batch)
        return response


def prepare_socket_path(path: Path) -> None:
    """Remove a socket file a dead shard left behind; refuse a live one or a non-socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if clear_stale_socket(path, flag="--uds-path"):
        logger.info(f"Removed stale socket {path}")


class ShardServer:
    """The gRPC server of one rank; ``start`` / ``stop`` are safe to call from tests."""

    def __init__(
        self,
        generator: Generator,
        *,
        uds_path: str,
        rank: int,
        world_size: int,
        worker: ModelWorker | None = None,
    ) -> None:
        self.generator = generator
        self.rank = rank
        self.url = shard_url(uds_path, rank)
        self.socket_path = Path(shard_socket(uds_path, rank))
        self.urls = [shard_url(uds_path, r) for r in range(world_size)]
        self.worker = worker or ModelWorker()
        self._server: grpc.aio.Server | None = None
        self._owns_socket = False

    async def start(self) -> None:
        """Bind the socket and serve; raises ``OSError`` naming the path when it cannot bind."""
        prepare_socket_path(self.socket_path)
        server = grpc.aio.server(interceptors=[ExceptionInterceptor()])
        generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(
            ShardServicer(self.generator, self.urls, self.worker), server
        )
        # Only this user may connect (connecting needs write permission on the socket file):
        # the socket is created under a restrictive umask, so there is no window where it is open.
        umask = os.umask(0o077)
        try:
            if server.add_insecure_port(self.url) == 0:
                raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {self.url}")
            self._owns_socket = True
            await server.start()
        finally:
            os.umask(umask)
        os.chmod(self.socket_path, 0o600)
        self._server = server
        logger.info(f"Serving on {self.url}")

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Finish (or after ``grace`` cancel) in-flight RPCs, remove the socket, stop the worker."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        # Only our own socket: after a failed start the path may belong to a live server.
        if self._owns_socket:
            self.socket_path.unlink(missing_ok=True)
            self._owns_socket = False
        self.worker.shutdown()


async def serve(
    generator: Generator,
    *,
    uds_path: str,
    rank: int,
    world_size: int,
    worker: ModelWorker | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly; model calls run on ``worker``."""
    server = ShardServer(generator, uds_path=uds_path, rank=rank, world_size=world_size, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.start()
        await stop.wait()
        logger.info(f"Received {received[0]}; stopping the shard")
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
