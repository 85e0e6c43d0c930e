"""Benchmark a running server through the public TGIS API (``fmaas.GenerationService``).

Each request of a batch is its own ``GenerateStream`` call, all sent at once,
so the router batches them as it would concurrent users. Prompts are cut to
an exact token count by the server itself (``truncate_input_tokens``), and
``min_new_tokens == max_new_tokens`` makes every request generate exactly
the asked number of tokens.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from text_generation_server.pb.fmaas import generation_pb2 as pb
from text_generation_server.pb.fmaas import generation_pb2_grpc

from text_generation_benchmark.measure import RunMeasurement, Shape, TargetError, from_token_times

# Any text works: the server keeps only the last ``prompt_tokens`` tokens of it.
PROMPT_SENTENCE = (
    "The history of the printing press shows how a single technical idea, movable type, "
    "changed how people shared knowledge across Europe within a few decades. "
)
MODEL_ID = "benchmark"


class ServerTarget:
    """A ``text-generation-launcher`` (router) at ``address`` (``host:port``)."""

    kind = "server"

    def __init__(self, address: str, *, connect_timeout: float = 10.0, request_timeout: float = 600.0) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: generation_pb2_grpc.GenerationServiceStub | None = None
        self._prompts: dict[int, str] = {}
        self.max_sequence_length = 0
        self.max_new_tokens = 0

    async def connect(self) -> None:
        """Open the channel and read the server's limits; :class:`TargetError` when nobody answers."""
        self._channel = grpc.aio.insecure_channel(self.address)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.connect_timeout)
        except TimeoutError:
            await self.close()
            raise TargetError(
                f"no gRPC server answered at {self.address} within {self.connect_timeout:g} s; "
                f"start one with `text-generation-launcher` or pass --server HOST:PORT"
            ) from None
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)
        info = await self._call(self._stub.ModelInfo(pb.ModelInfoRequest(model_id=MODEL_ID), timeout=30))
        self.max_sequence_length = info.max_sequence_length
        self.max_new_tokens = info.max_new_tokens

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "address": self.address,
            "max_sequence_length": self.max_sequence_length,
            "max_new_tokens": self.max_new_tokens,
        }

    def check(self, shape: Shape) -> None:
        """Refuse a shape the server's limits would reject, naming the limit."""
        if self.max_sequence_length and shape.prompt_tokens + shape.new_tokens > self.max_sequence_length:
            raise TargetError(
                f"prompt {shape.prompt_tokens} + new {shape.new_tokens} tokens exceeds the server's "
                f"max sequence length {self.max_sequence_length} (--max-total-tokens)"
            )
        if self.max_new_tokens and shape.new_tokens > self.max_new_tokens:
            raise TargetError(
                f"--decode-length {shape.new_tokens} exceeds the server's --max-new-tokens {self.max_new_tokens}"
            )

    async def _call(self, awaitable):
        try:
            return await awaitable
        except grpc.aio.AioRpcError as err:
            raise TargetError(f"server {self.address}: {err.code().name}: {err.details()}") from None

    async def _prompt(self, tokens: int) -> str:
        """A text of at least ``tokens`` tokens by the server's own tokenizer."""
        if tokens in self._prompts:
            return self._prompts[tokens]
        assert self._stub is not None
        repeats = max(1, tokens // 16)
        while True:
            text = PROMPT_SENTENCE * repeats
            answer = await self._call(
                self._stub.Tokenize(
                    pb.BatchedTokenizeRequest(model_id=MODEL_ID, requests=[pb.TokenizeRequest(text=text)]),
                    timeout=60,
                )
            )
            if answer.responses[0].token_count >= tokens:
                self._prompts[tokens] = text
                return text
            repeats *= 2

    async def run(self, shape: Shape, texts: list[str] | None = None) -> RunMeasurement:
        """Send ``shape.batch_size`` streams at once and time every token of each.

        ``texts``: one prompt per request, each at least ``shape.prompt_tokens``
        tokens long (the server keeps the last ones); default: a built-in text.
        """
        assert self._stub is not None, "connect() first"
        if texts is None:
            texts = [await self._prompt(shape.prompt_tokens)] * shape.batch_size
        if len(texts) != shape.batch_size:
            raise ValueError(f"{len(texts)} prompts for a batch of {shape.batch_size}")
        params = pb.Parameters(
            method=pb.GREEDY,
            stopping=pb.StoppingCriteria(max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens),
            truncate_input_tokens=shape.prompt_tokens,
        )
        start = time.perf_counter()
        streams = await asyncio.gather(
            *(self._stream(pb.SingleGenerationRequest(model_id=MODEL_ID, request=pb.GenerationRequest(text=text),
                                                      params=params), shape) for text in texts)
        )
        return from_token_times(shape, start, streams)

    async def _stream(self, request: pb.SingleGenerationRequest, shape: Shape) -> list[float]:
        """Arrival time of each generated token (a message carrying k tokens counts k times)."""
        times: list[float] = []
        generated = 0
        try:
            async for message in self._stub.GenerateStream(request, timeout=self.request_timeout):
                now = time.perf_counter()
                if message.input_token_count and message.input_token_count != shape.prompt_tokens and not times:
                    raise TargetError(
                        f"the server used {message.input_token_count} prompt tokens instead of {shape.prompt_tokens}"
                    )
                new = message.generated_token_count - generated
                if new > 0:
                    times.extend([now] * new)
                    generated = message.generated_token_count
        except grpc.aio.AioRpcError as err:
            raise TargetError(f"server {self.address}: GenerateStream: {err.code().name}: {err.details()}") from None
        if generated != shape.new_tokens:
            raise TargetError(f"the server generated {generated} tokens instead of {shape.new_tokens}")
        return times
