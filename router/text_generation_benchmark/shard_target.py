"""Benchmark the shards directly over the internal API (``generate.v1``): Prefill, then Decode.

This is the model's own speed without the router: one Prefill RPC for the
whole batch, then one Decode RPC per generated token. Every shard of the
group gets every call (they run in lockstep), as the router would send them.
Batch and request ids are taken from a range the router never uses, and only
the benchmark's own batch is cleared, so a live router's batches are left alone.
"""

from __future__ import annotations

import random
import time
from typing import Any

from loguru import logger
from text_generation_router.shard_client import ShardClient, ShardConnectError, ShardError
from text_generation_server.pb.generate.v1 import generate_pb2 as pb

from text_generation_benchmark.measure import RunMeasurement, Shape, TargetError

# Far above any id a router hands out.
ID_BASE = 1 << 62


class ShardTarget:
    """The shard group whose rank-0 socket is ``{uds_path}-0``."""

    kind = "shard"

    def __init__(self, uds_path: str, *, connect_timeout: float = 10.0, seed: int = 0) -> None:
        self.uds_path = uds_path
        self.connect_timeout = connect_timeout
        self._client: ShardClient | None = None
        self._info: pb.InfoResponse | None = None
        self._rng = random.Random(seed)
        self._next_id = ID_BASE
        self.world_size = 0

    async def connect(self) -> None:
        try:
            self._client = await ShardClient.connect(self.uds_path, self.connect_timeout)
            self._info = await self._client.info(ready_timeout=self.connect_timeout)
            self.world_size = self._client.world_size
        except ShardConnectError as err:
            raise TargetError(str(err)) from None
        except ShardError as err:
            raise TargetError(f"shard at {self.uds_path}-0 did not answer Info: {err}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def describe(self) -> dict[str, Any]:
        info = self._info
        return {
            "kind": self.kind,
            "uds_path": self.uds_path,
            "world_size": self.world_size,
            "model_id": info.model_id if info else "",
            "dtype": info.dtype if info else "",
            "quantize": info.quantize if info else "",
            "kernel": info.kernel if info else "",
        }

    async def _clear(self, batch_id: int) -> None:
        try:
            await self._client.clear_cache(batch_id)
        except ShardError as err:  # the run's own error, if any, is the one to report
            logger.warning(f"could not clear benchmark batch {batch_id}: {err}")

    def check(self, shape: Shape) -> None:
        limit = self._info.max_position_embeddings if self._info else 0
        if limit and shape.prompt_tokens + shape.new_tokens > limit:
            raise TargetError(
                f"prompt {shape.prompt_tokens} + new {shape.new_tokens} tokens exceeds the model's "
                f"max_position_embeddings {limit}"
            )

    def _batch(self, shape: Shape, prompt_ids: list[list[int]] | None) -> pb.Batch:
        assert self._info is not None
        if prompt_ids is None:
            vocab = int(self._info.vocab_size)
            # Ordinary token ids, away from the special tokens at the start of most vocabularies.
            low, high = min(256, vocab - 1), vocab - 1
            prompt_ids = [
                [self._rng.randint(low, high) for _ in range(shape.prompt_tokens)] for _ in range(shape.batch_size)
            ]
        if len(prompt_ids) != shape.batch_size or any(len(p) != shape.prompt_tokens for p in prompt_ids):
            raise ValueError(f"prompt_ids must be {shape.batch_size} lists of {shape.prompt_tokens} token ids")
        requests = []
        for ids in prompt_ids:
            self._next_id += 1
            requests.append(
                pb.Request(
                    id=self._next_id,
                    input_ids=ids,
                    sampling=pb.SamplingParameters(do_sample=False),
                    stopping=pb.StoppingParameters(max_new_tokens=shape.new_tokens, ignore_eos_token=True),
                )
            )
        self._next_id += 1
        return pb.Batch(id=self._next_id, requests=requests)

    async def run(self, shape: Shape, prompt_ids: list[list[int]] | None = None) -> RunMeasurement:
        """One Prefill of the batch, then Decode until every request has ``new_tokens`` tokens.

        ``prompt_ids``: one list of ``shape.prompt_tokens`` ids per request; default: random ids.
        """
        assert self._client is not None, "connect() first"
        batch = self._batch(shape, prompt_ids)
        step_s: list[float] = []
        forward_ns: list[int] = []
        try:
            start = time.perf_counter()
            answer = await self._client.prefill(batch)
            prefill_s = time.perf_counter() - start
            generated = len(answer.generations)
            cached = answer.batch if answer.HasField("batch") else None
            while cached is not None:
                t0 = time.perf_counter()
                answer = await self._client.decode([cached])
                step_s.append(time.perf_counter() - t0)
                forward_ns.append(answer.timings.forward_ns)
                generated += len(answer.generations)
                cached = answer.batch if answer.HasField("batch") else None
            total_s = time.perf_counter() - start
        except ShardError as err:
            raise TargetError(f"shard at {self.uds_path}-0: {err}") from None
        finally:
            await self._clear(batch.id)
        expected = shape.batch_size * shape.new_tokens
        if generated != expected:
            raise TargetError(f"the shards generated {generated} tokens instead of {expected}")
        extra = {}
        if forward_ns:
            extra["decode_forward_ms_mean"] = sum(forward_ns) / len(forward_ns) / 1e6
        return RunMeasurement(
            shape=shape,
            prefill_s=prefill_s,
            ttft_s=[prefill_s] * shape.batch_size,
            inter_token_s=[s for s in step_s for _ in range(shape.batch_size)],
            total_s=total_s,
            generated_tokens=generated,
            extra=extra,
        )
