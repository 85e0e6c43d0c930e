"""An in-process fake shard group for router tests: the real internal gRPC API, a toy model.

``FakeShardGroup`` serves generate.v1.TextGenerationService on
``{uds_path}-{rank}`` for each rank with a deterministic "model": the next
token is a function of the last token and the position (plus the seed when
sampling), or follows a fixed script. It honours the internal contract:
Prefill/Decode/FilterBatch/ClearCache with cached batches, stopping on
max_new_tokens / EOS (masked until min_new_tokens) / stop token ids, a KV
capacity in tokens (RESOURCE_EXHAUSTED beyond it), prefill logprobs, top-n
tokens, an optional per-step delay. Every call is recorded so tests can
see what the router sent (e.g. the FilterBatch that frees a cancelled
request).

``RouterHarness`` runs a fake group and a real Router on a background event
loop, so tests use ordinary blocking gRPC clients as a user would.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from text_generation_server.pb.fmaas import generation_pb2_grpc
from text_generation_server.pb.generate.v1 import generate_pb2, generate_pb2_grpc


@dataclass
class FakeModel:
    """The toy model and the shard's resources."""

    vocab_size: int = 384
    eos_token_id: int = 2
    # Emit EOS as the n-th generated token (when min_new_tokens allows).
    eos_after: int | None = None
    # Generated tokens follow this list (cycled) instead of the formula.
    script: list[int] | None = None
    step_delay: float = 0.0
    kv_capacity: int = 100_000
    # What Warmup reports as capacity (default: kv_capacity); a larger value makes the router over-admit.
    reported_capacity: int | None = None
    max_position_embeddings: int = 256
    block_size: int = 16
    # Lowest id the formula may produce (skips special tokens).
    first_plain_id: int = 4
    # A real model instead of the formula: all token ids so far -> next id.
    next_token_fn: Callable[[list[int]], int] | None = None
    # A prefill holding a request with this input id is refused, as a shard refuses a request it
    # cannot run: INVALID_ARGUMENT naming the request ("request N: ...") when poison_named, else
    # INTERNAL without saying which.
    poison_id: int | None = None
    poison_named: bool = True

    def next_token(self, state: _RequestState) -> int:
        n = len(state.generated)
        if self.next_token_fn is not None:
            token = self.next_token_fn(state.all_ids)
        elif self.script is not None:
            token = self.script[n % len(self.script)]
        else:
            last = state.all_ids[-1]
            seed = state.request.sampling.seed if state.request.sampling.do_sample else 0
            span = self.vocab_size - self.first_plain_id
            token = self.first_plain_id + (last * 31 + len(state.all_ids) * 7 + 11 + seed) % span
        if self.eos_after is not None and n + 1 >= self.eos_after:
            token = self.eos_token_id
        stopping = state.request.stopping
        masked = {self.eos_token_id, *stopping.stop_token_ids}
        if n + 1 < stopping.min_new_tokens and token in masked:
            token = self.first_plain_id + (token + 1) % (self.vocab_size - self.first_plain_id)
        return token

    @staticmethod
    def logprob(position: int) -> float:
        return -0.125 * (1 + position % 4)


@dataclass
class _RequestState:
    request: generate_pb2.Request
    all_ids: list[int]
    generated: list[int] = field(default_factory=list)


class FakeShard(generate_pb2_grpc.TextGenerationServiceServicer):
    """One rank's servicer; every rank of a group computes the same answers."""

    def __init__(self, model: FakeModel, rank: int, urls: list[str]) -> None:
        self.model = model
        self.rank = rank
        self.urls = urls
        self.batches: dict[int, list[_RequestState]] = {}
        self.calls: list[tuple[str, object]] = []
        self.healthy = True
        # method name -> (code, details): the next call of that method fails (once).
        self.fail_next: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.warmups: list[generate_pb2.WarmupRequest] = []

    # ---- helpers ---------------------------------------------------------------------

    def tokens_held(self) -> int:
        return sum(len(s.all_ids) for states in self.batches.values() for s in states)

    def kv_usage(self) -> generate_pb2.KvCacheUsage:
        """Blocks a paged cache would hold for the tokens held (each request fills whole blocks)."""
        bs = self.model.block_size
        used = sum(-(-len(s.all_ids) // bs) for states in self.batches.values() for s in states)
        return generate_pb2.KvCacheUsage(blocks_used=used, blocks_total=self.model.kv_capacity // bs)

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    async def _enter(self, method: str, request, context) -> None:
        copy = type(request)()
        copy.CopyFrom(request)
        self.calls.append((method, copy))
        failure = self.fail_next.pop(method, None)
        if failure is not None:
            await context.abort(*failure)

    def _cached(self, batch_id: int) -> generate_pb2.CachedBatch:
        states = self.batches[batch_id]
        return generate_pb2.CachedBatch(
            id=batch_id,
            request_ids=[s.request.id for s in states],
            size=len(states),
            current_tokens=sum(len(s.all_ids) for s in states),
            max_tokens=sum(len(s.request.input_ids) + s.request.stopping.max_new_tokens for s in states),
        )

    def _advance(self, state: _RequestState, prefill: bool) -> generate_pb2.Generation:
        model = self.model
        token_id = model.next_token(state)
        position = len(state.all_ids)
        state.generated.append(token_id)
        state.all_ids.append(token_id)
        top_n = state.request.top_n_tokens
        top = [generate_pb2.TopToken(id=token_id, logprob=model.logprob(position))]
        top += [
            generate_pb2.TopToken(id=(token_id + k) % model.vocab_size, logprob=model.logprob(position) - k)
            for k in range(1, top_n)
        ]
        generation = generate_pb2.Generation(
            request_id=state.request.id,
            token=generate_pb2.Token(id=token_id, logprob=model.logprob(position), rank=1, top_tokens=top[:top_n]),
            generated_tokens=len(state.generated),
            seed=state.request.sampling.seed,
        )
        if prefill and state.request.prefill_logprobs:
            ids = list(state.request.input_ids)
            generation.prefill_tokens.extend(
                generate_pb2.Token(id=t, logprob=0.0 if i == 0 else model.logprob(i), rank=0 if i == 0 else 2)
                for i, t in enumerate(ids)
            )
        stopping = state.request.stopping
        if token_id in stopping.stop_token_ids:
            generation.finish_reason = generate_pb2.FINISH_REASON_STOP_TOKEN
        elif token_id == model.eos_token_id and not stopping.ignore_eos_token:
            generation.finish_reason = generate_pb2.FINISH_REASON_EOS_TOKEN
        elif len(state.generated) >= stopping.max_new_tokens:
            generation.finish_reason = generate_pb2.FINISH_REASON_LENGTH
        return generation

    def _step(self, batch_id: int, states: list[_RequestState], prefill: bool):
        generations = [self._advance(s, prefill) for s in states]
        live = [s for s, g in zip(states, generations, strict=True) if g.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED]
        if live:
            self.batches[batch_id] = live
            return generations, self._cached(batch_id)
        self.batches.pop(batch_id, None)
        return generations, None

    # ---- RPCs ------------------------------------------------------------------------

    async def Info(self, request, context):
        await self._enter("Info", request, context)
        m = self.model
        return generate_pb2.InfoResponse(
            model_id="fake-model",
            architecture="FakeForCausalLM",
            dtype="float32",
            device_type="cpu",
            world_size=len(self.urls),
            max_position_embeddings=m.max_position_embeddings,
            vocab_size=m.vocab_size,
            eos_token_ids=[m.eos_token_id],
            block_size=m.block_size,
            kernel="fake",
        )

    async def Health(self, request, context):
        await self._enter("Health", request, context)
        if not self.healthy:
            await context.abort(grpc.StatusCode.INTERNAL, "fake shard marked unhealthy")
        return generate_pb2.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        await self._enter("ServiceDiscovery", request, context)
        return generate_pb2.ServiceDiscoveryResponse(urls=self.urls)

    async def ClearCache(self, request, context):
        await self._enter("ClearCache", request, context)
        if request.HasField("id"):
            self.batches.pop(request.id, None)
        else:
            self.batches.clear()
        return generate_pb2.ClearCacheResponse(kv_cache=self.kv_usage())

    async def FilterBatch(self, request, context):
        await self._enter("FilterBatch", request, context)
        if request.batch_id not in self.batches:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"batch {request.batch_id} not found")
        keep = set(request.request_ids)
        self.batches[request.batch_id] = [s for s in self.batches[request.batch_id] if s.request.id in keep]
        return generate_pb2.FilterBatchResponse(batch=self._cached(request.batch_id), kv_cache=self.kv_usage())

    async def Warmup(self, request, context):
        await self._enter("Warmup", request, context)
        self.warmups.append(request)
        capacity = self.model.reported_capacity or self.model.kv_capacity
        return generate_pb2.WarmupResponse(
            max_supported_total_tokens=capacity,
            num_blocks=capacity // self.model.block_size,
            block_size=self.model.block_size,
        )

    async def Prefill(self, request, context):
        await self._enter("Prefill", request, context)
        if self.model.step_delay:
            await asyncio.sleep(self.model.step_delay)
        batch = request.batch
        needed = sum(len(r.input_ids) + 1 for r in batch.requests)
        if self.tokens_held() + needed > self.model.kv_capacity:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"KV cache full: {self.tokens_held()} held + {needed} needed > {self.model.kv_capacity}",
            )
        if batch.id in self.batches:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {batch.id} already exists")
        poisoned = [r.id for r in batch.requests if self.model.poison_id in r.input_ids]
        if poisoned and self.model.poison_named:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request {poisoned[0]}: input id {self.model.poison_id} cannot be run"
            )
        if poisoned:
            await context.abort(grpc.StatusCode.INTERNAL, f"batch {batch.id}: a request cannot be run")
        states = [_RequestState(request=r, all_ids=list(r.input_ids)) for r in batch.requests]
        generations, cached = self._step(batch.id, states, prefill=True)
        response = generate_pb2.PrefillResponse(generations=generations, kv_cache=self.kv_usage())
        if cached is not None:
            response.batch.CopyFrom(cached)
        return response

    async def Decode(self, request, context):
        await self._enter("Decode", request, context)
        if self.model.step_delay:
            await asyncio.sleep(self.model.step_delay)
        ids = [b.id for b in request.batches]
        missing = [i for i in ids if i not in self.batches]
        if missing or not ids:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"batches {missing} not found")
        states = [s for i in ids for s in self.batches.pop(i)]
        if self.tokens_held() + sum(len(s.all_ids) + 1 for s in states) > self.model.kv_capacity:
            self.batches[ids[0]] = states
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full during decode")
        generations, cached = self._step(ids[0], states, prefill=False)
        response = generate_pb2.DecodeResponse(generations=generations, kv_cache=self.kv_usage())
        if cached is not None:
            response.batch.CopyFrom(cached)
        return response


class FakeShardGroup:
    """``world_size`` fake shards on ``{uds_path}-{rank}``, served on the running event loop."""

    def __init__(self, uds_path: str, model: FakeModel | None = None, world_size: int = 1) -> None:
        self.uds_path = uds_path
        self.model = model or FakeModel()
        self.urls = [f"unix://{uds_path}-{rank}" for rank in range(world_size)]
        self.shards = [FakeShard(self.model, rank, self.urls) for rank in range(world_size)]
        self._servers: list[grpc.aio.Server | None] = []

    async def start(self) -> None:
        for shard, url in zip(self.shards, self.urls, strict=True):
            server = grpc.aio.server()
            generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
            server.add_insecure_port(url)
            await server.start()
            self._servers.append(server)

    async def kill(self, rank: int) -> None:
        """Stop one shard abruptly (its socket file is left behind, as after SIGKILL)."""
        server = self._servers[rank]
        if server is not None:
            await server.stop(None)
            self._servers[rank] = None

    async def stop(self) -> None:
        for rank in range(len(self._servers)):
            await self.kill(rank)
        for url in self.urls:
            Path(url.removeprefix("unix://")).unlink(missing_ok=True)


class LoopThread:
    """An asyncio event loop on a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        """Run a plain function on the loop thread (for state owned by the loop)."""

        async def _call():
            return fn(*args)

        return self.run(_call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def make_tokenizer_dir(path: Path) -> Path:
    """The tiny byte-level BPE tokenizer of tests/tiny_model.py, saved to ``path``."""
    from tiny_model import build_tokenizer

    build_tokenizer(Path(path))
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouterHarness:
    """A fake shard group plus a real Router on a background loop; blocking clients for tests."""

    def __init__(self, tmp_path: Path, tokenizer_dir: Path, model: FakeModel | None = None, world_size: int = 1, **router_args) -> None:
        from text_generation_router.config import RouterArgs

        self.loop = LoopThread()
        self.uds_path = str(tmp_path / "shard")
        self.group = FakeShardGroup(self.uds_path, model, world_size)
        defaults = dict(
            tokenizer=str(tokenizer_dir),
            shard_uds_path=self.uds_path,
            grpc_port=0,
            port=0,
            hostname="127.0.0.1",
            shard_connect_timeout=10.0,
        )
        self.args = replace(RouterArgs(), **{**defaults, **router_args})
        self.router = None
        self._channels: list[grpc.Channel] = []

    @property
    def model(self) -> FakeModel:
        return self.group.model

    @property
    def shard(self) -> FakeShard:
        return self.group.shards[0]

    def start(self, *, shards_first: bool = True) -> RouterHarness:
        from text_generation_router.server import Router

        if shards_first:
            self.loop.run(self.group.start())
        self.router = self.loop.call(Router, self.args)
        self.loop.run(self.router.start())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.router.grpc_port}"

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def stub(self) -> generation_pb2_grpc.GenerationServiceStub:
        return generation_pb2_grpc.GenerationServiceStub(self.channel())

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.router.http_port}{path}", timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample of the router's metrics (0 when absent)."""
        value = self.router.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None or math.isnan(value) else value

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        if self.router is not None:
            self.loop.run(self.router.stop())
        self.loop.run(self.group.stop())
        self.loop.close()
