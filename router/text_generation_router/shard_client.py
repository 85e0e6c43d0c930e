"""Client for the shards' internal gRPC API (generate.v1.TextGenerationService).

Shards run in lockstep: every rank must see the same RPCs in the same order,
or their collective operations pair up wrongly. So every call here goes to
all shards at once, calls are serialized by one lock, and rank 0's answer is
the result. If the shards do not all agree (one fails, another succeeds or
fails differently) the group can no longer be trusted and the error is
marked fatal.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from loguru import logger
from text_generation_server.pb.generate.v1 import generate_pb2, generate_pb2_grpc

# Codes that mean the shard process or its socket is gone (or speaks another API),
# not that one batch went wrong.
_FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# How long the other shards get to report after one failed, before the group is declared broken.
_DISAGREEMENT_GRACE_S = 2.0
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


class ShardError(RuntimeError):
    """An internal RPC failed. ``fatal`` means the shard group is unusable (dead or out of step)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, *, rank: int, fatal: bool) -> None:
        super().__init__(f"{method} failed on shard {rank}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details
        self.rank = rank
        self.fatal = fatal

    @property
    def resource_exhausted(self) -> bool:
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not self.fatal


class ShardConnectError(RuntimeError):
    """The first shard never became reachable; the message says where the router looked."""


@dataclass(frozen=True)
class _Shard:
    url: str
    channel: grpc.aio.Channel
    stub: generate_pb2_grpc.TextGenerationServiceStub


def shard_url(path: str) -> str:
    """gRPC target for a shard socket path or url ('unix:...' urls pass through)."""
    return path if path.startswith("unix:") else f"unix://{path}"


def _open(url: str) -> _Shard:
    channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
    return _Shard(url=url, channel=channel, stub=generate_pb2_grpc.TextGenerationServiceStub(channel))


class ShardClient:
    """All shards of one model, called together."""

    def __init__(self, shards: list[_Shard]) -> None:
        if not shards:
            raise ValueError("ShardClient needs at least one shard")
        self._shards = shards
        self._lock = asyncio.Lock()
        self._monitor_tasks: list[asyncio.Task] = []
        # Rank 0's KV cache usage after the latest call that reports it (ranks allocate alike).
        self.kv_usage: generate_pb2.KvCacheUsage | None = None
        # Seconds one step (Prefill, Decode, FilterBatch, ClearCache) or Health may take; a shard
        # that takes longer is stuck (stopped, deadlocked) and the call fails DEADLINE_EXCEEDED,
        # which is fatal. None: no bound (start-up, before the router sets it).
        self.step_timeout: float | None = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._shards]

    @property
    def world_size(self) -> int:
        return len(self._shards)

    @classmethod
    async def connect(cls, uds_path: str, timeout: float) -> ShardClient:
        """Wait for ``{uds_path}-0``, ask it for every shard's url, and open a channel to each."""
        first = f"{uds_path}-0"
        deadline = time.monotonic() + timeout
        waited_logged = False
        while not os.path.exists(first):
            if time.monotonic() >= deadline:
                raise ShardConnectError(
                    f"no shard socket at {first} after {timeout:.0f} s; start the shards with "
                    f"`text-generation-server serve MODEL --uds-path {uds_path}` or fix --shard-uds-path"
                )
            if not waited_logged:
                logger.info(f"Waiting for shard socket {first}")
                waited_logged = True
            await asyncio.sleep(0.1)
        bootstrap = _open(shard_url(first))
        try:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                answer = await bootstrap.stub.ServiceDiscovery(
                    generate_pb2.ServiceDiscoveryRequest(), timeout=remaining, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as err:
                raise ShardConnectError(
                    f"shard socket {first} exists but ServiceDiscovery failed: {err.code().name}: {err.details()}"
                ) from None
        finally:
            await bootstrap.channel.close()
        urls = [shard_url(u) for u in answer.urls] or [shard_url(first)]
        logger.info(f"Discovered {len(urls)} shard(s): {', '.join(urls)}")
        return cls([_open(u) for u in urls])

    async def close(self) -> None:
        for task in self._monitor_tasks:
            task.cancel()
        for shard in self._shards:
            await shard.channel.close()

    async def _call_all(self, method: str, request, timeout: float | None = None, wait_for_ready: bool | None = None):
        """Send ``request`` to every shard concurrently; rank 0's answer, or a ShardError."""
        async with self._lock:
            calls = [
                asyncio.ensure_future(
                    getattr(shard.stub, method)(request, timeout=timeout, wait_for_ready=wait_for_ready)
                )
                for shard in self._shards
            ]
            try:
                done, pending = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
            except asyncio.CancelledError:
                for call in calls:
                    call.cancel()
                raise
            if pending:
                # One shard failed early; give the others a moment to fail the same way.
                _, pending = await asyncio.wait(pending, timeout=_DISAGREEMENT_GRACE_S)
                for call in pending:
                    call.cancel()
            outcomes = [self._outcome(call) for call in calls]
        errors = [(rank, o) for rank, o in enumerate(outcomes) if isinstance(o, BaseException)]
        if not errors:
            return outcomes[0]
        rank, first = errors[0]
        if isinstance(first, grpc.aio.AioRpcError):
            code, details = first.code(), first.details() or ""
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                details = (f"no answer within {timeout:g} s (--shard-step-timeout): the shard is stuck "
                           f"(stopped, deadlocked or far slower than its peers)")
        else:
            code, details = grpc.StatusCode.UNKNOWN, str(first) or type(first).__name__
        codes = {o.code() if isinstance(o, grpc.aio.AioRpcError) else None for _, o in errors}
        agree = len(errors) == len(outcomes) and len(codes) == 1
        fatal = code in _FATAL_CODES or not agree
        if not agree and len(outcomes) > 1:
            details = f"{details} (the other shards did not fail the same way; the shard group is out of step)"
        raise ShardError(method, code, details, rank=rank, fatal=fatal)

    @staticmethod
    def _outcome(call: asyncio.Future):
        if call.cancelled():
            return asyncio.CancelledError("no answer in time")
        if call.exception() is not None:
            return call.exception()
        return call.result()

    async def info(self, ready_timeout: float | None = None) -> generate_pb2.InfoResponse:
        """Model facts; with ``ready_timeout``, first wait up to that long for every shard to accept calls."""
        if ready_timeout is None:
            return await self._call_all("Info", generate_pb2.InfoRequest())
        return await self._call_all("Info", generate_pb2.InfoRequest(), timeout=ready_timeout, wait_for_ready=True)

    async def health(self, timeout: float | None = None) -> None:
        await self._call_all("Health", generate_pb2.HealthRequest(), timeout=timeout or self.step_timeout)

    def _note_usage(self, answer):
        if answer.HasField("kv_cache"):
            self.kv_usage = answer.kv_cache
        return answer

    async def clear_cache(self, batch_id: int | None = None) -> None:
        request = generate_pb2.ClearCacheRequest() if batch_id is None else generate_pb2.ClearCacheRequest(id=batch_id)
        self._note_usage(await self._call_all("ClearCache", request, timeout=self.step_timeout))

    async def warmup(self, request: generate_pb2.WarmupRequest) -> generate_pb2.WarmupResponse:
        return await self._call_all("Warmup", request)

    async def prefill(self, batch: generate_pb2.Batch, chunk_tokens: int = 0) -> generate_pb2.PrefillResponse:
        request = generate_pb2.PrefillRequest(batch=batch, chunk_tokens=chunk_tokens)
        return self._note_usage(await self._call_all("Prefill", request, timeout=self.step_timeout))

    async def decode(self, batches: list[generate_pb2.CachedBatch], chunk_tokens: int = 0) -> generate_pb2.DecodeResponse:
        request = generate_pb2.DecodeRequest(batches=batches, chunk_tokens=chunk_tokens)
        return self._note_usage(await self._call_all("Decode", request, timeout=self.step_timeout))

    async def filter_batch(self, batch_id: int, keep: list[int]) -> generate_pb2.CachedBatch:
        answer = await self._call_all(
            "FilterBatch", generate_pb2.FilterBatchRequest(batch_id=batch_id, request_ids=keep),
            timeout=self.step_timeout,
        )
        return self._note_usage(answer).batch

    def watch(self, on_lost: Callable[[str], Awaitable[None]]) -> None:
        """Watch every shard channel; when one drops its connection and Health fails, call ``on_lost``.

        A dropped connection alone is not proof (channels also go idle); the
        Health call through the normal lock is.
        """
        for rank, shard in enumerate(self._shards):
            self._monitor_tasks.append(asyncio.ensure_future(self._watch_one(rank, shard, on_lost)))
        if self.step_timeout is not None:
            self._monitor_tasks.append(asyncio.ensure_future(self._probe(on_lost)))

    async def _probe(self, on_lost: Callable[[str], Awaitable[None]]) -> None:
        """Health of every shard every few seconds, bounded by the step timeout: a shard that is
        stopped (SIGSTOP) keeps its connection open, so only a call that goes unanswered shows it,
        also while no request runs."""
        assert self.step_timeout is not None
        interval = min(10.0, self.step_timeout)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.health()
            except ShardError as err:
                if err.fatal:
                    await on_lost(f"shard {err.rank} failed its health check: {err}")
                    return

    async def _watch_one(self, rank: int, shard: _Shard, on_lost: Callable[[str], Awaitable[None]]) -> None:
        state = shard.channel.get_state(try_to_connect=False)
        while True:
            await shard.channel.wait_for_state_change(state)
            state = shard.channel.get_state(try_to_connect=False)
            if state not in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
                continue
            try:
                await self.health(timeout=30.0)
            except ShardError as err:
                if err.fatal:
                    await on_lost(f"shard {rank} ({shard.url}) is unreachable: {err}")
                    return
            state = shard.channel.get_state(try_to_connect=False)
