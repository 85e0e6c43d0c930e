"""The continuous-batching scheduler alone: plain asyncio, a scripted in-memory shard, no gRPC, no model.

Each test drives :class:`Scheduler` against :class:`ScriptedShards`, which
keeps the shards' view (cached batches, tokens held) exactly as the internal
API defines it and records every call, so admission decisions are checked
step by step: one test per budget (prefill tokens, batch total tokens,
waiting steps, served ratio, batch size) and the fairness guarantee.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from text_generation_router.config import Limits
from text_generation_router.metrics import RouterMetrics
from text_generation_router.request import SamplingConfig, ValidatedRequest
from text_generation_router.scheduler import Scheduler
from text_generation_server.pb.fmaas import generation_pb2 as fmaas
from text_generation_server.pb.generate.v1 import generate_pb2

pytestmark = pytest.mark.timeout(30)


class _Tokenizer:
    """Every token decodes to one letter, so detokenization is trivial."""

    def decode(self, ids) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def id_to_token(self, token_id: int) -> str:
        return chr(ord("a") + token_id % 26)


@dataclass
class _Held:
    request: generate_pb2.Request
    generated: int = 0
    prefilled: int = 0  # prompt tokens in the cache (chunked prefill)

    @property
    def tokens(self) -> int:
        return self.prefilled + self.generated


@dataclass
class ScriptedShards:
    """The internal API's semantics in memory; ``on_decode(n)`` runs before the n-th Decode (1-based)."""

    on_decode: Callable[[int], None] | None = None
    kv_usage: generate_pb2.KvCacheUsage | None = None
    calls: list[tuple[str, list[int]]] = field(default_factory=list)
    batches: dict[int, list[_Held]] = field(default_factory=dict)
    decodes: int = 0
    chunks: list[int] = field(default_factory=list)  # chunk_tokens of every Prefill and Decode

    def tokens_held(self) -> int:
        return sum(h.tokens for held in self.batches.values() for h in held)

    def _step(self, batch_id: int, held: list[_Held], chunk: int = 0):
        generations, live = [], []
        budget = chunk or None
        for h in held:
            left = len(h.request.input_ids) - h.prefilled
            if left:
                take = left if budget is None else min(left, budget)
                if budget is not None:
                    budget -= take
                h.prefilled += take
                if take < left:
                    live.append(h)
                    continue
            h.generated += 1
            done = h.generated >= h.request.stopping.max_new_tokens
            generations.append(
                generate_pb2.Generation(
                    request_id=h.request.id,
                    token=generate_pb2.Token(id=4 + h.generated),
                    generated_tokens=h.generated,
                    finish_reason=generate_pb2.FINISH_REASON_LENGTH if done else generate_pb2.FINISH_REASON_UNSPECIFIED,
                )
            )
            if not done:
                live.append(h)
        if live:
            self.batches[batch_id] = live
        else:
            self.batches.pop(batch_id, None)
        return generations, self._cached(batch_id) if live else None

    def _cached(self, batch_id: int) -> generate_pb2.CachedBatch:
        held = self.batches[batch_id]
        return generate_pb2.CachedBatch(
            id=batch_id, request_ids=[h.request.id for h in held], size=len(held),
            current_tokens=sum(h.tokens for h in held),
        )

    async def prefill(self, batch: generate_pb2.Batch, chunk_tokens: int = 0) -> generate_pb2.PrefillResponse:
        await asyncio.sleep(0)
        self.calls.append(("Prefill", [r.id for r in batch.requests]))
        self.chunks.append(chunk_tokens)
        generations, cached = self._step(batch.id, [_Held(r) for r in batch.requests], chunk_tokens)
        answer = generate_pb2.PrefillResponse(generations=generations)
        if cached is not None:
            answer.batch.CopyFrom(cached)
        return answer

    async def decode(self, batches: list[generate_pb2.CachedBatch], chunk_tokens: int = 0) -> generate_pb2.DecodeResponse:
        self.decodes += 1
        self.chunks.append(chunk_tokens)
        if self.on_decode is not None:
            self.on_decode(self.decodes)
        await asyncio.sleep(0)
        held = [h for b in batches for h in self.batches.pop(b.id)]
        self.calls.append(("Decode", [h.request.id for h in held]))
        generations, cached = self._step(batches[0].id, held, chunk_tokens)
        answer = generate_pb2.DecodeResponse(generations=generations)
        if cached is not None:
            answer.batch.CopyFrom(cached)
        return answer

    async def filter_batch(self, batch_id: int, keep: list[int]) -> generate_pb2.CachedBatch:
        self.calls.append(("FilterBatch", list(keep)))
        self.batches[batch_id] = [h for h in self.batches[batch_id] if h.request.id in set(keep)]
        return self._cached(batch_id)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        self.calls.append(("ClearCache", [] if batch_id is None else [batch_id]))
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    def decode_sizes(self) -> list[int]:
        return [len(ids) for method, ids in self.calls if method == "Decode"]

    def prefills(self) -> list[list[int]]:
        return [ids for method, ids in self.calls if method == "Prefill"]


def limits(**overrides) -> Limits:
    values = dict(
        max_input_tokens=1000, max_total_tokens=2000, max_new_tokens=1000, default_max_new_tokens=20,
        max_stop_sequences=4, max_top_n_tokens=5, max_concurrent_requests=1000,
        max_batch_prefill_tokens=10_000, max_batch_total_tokens=100_000, max_waiting_tokens=20,
        waiting_served_ratio=0.3, max_batch_size=None, block_size=1, default_include_stop_sequence=True,
    )
    values.update(overrides)
    return Limits(**values)


def request(inputs: int, max_new: int) -> ValidatedRequest:
    return ValidatedRequest(
        text="x", input_ids=tuple(range(4, 4 + inputs)), sampling=SamplingConfig(), max_new_tokens=max_new
    )


class Run:
    """A scheduler over scripted shards on one event loop; ``submit`` may be called from ``on_decode``."""

    def __init__(self, shards: ScriptedShards, **limit_overrides) -> None:
        self.shards = shards
        self.limits = limits(**limit_overrides)
        self.metrics = RouterMetrics()
        self.scheduler = Scheduler(shards, _Tokenizer(), self.limits, self.metrics, on_fatal=self._fatal)
        self.entries = []
        self.max_running_tokens = 0

    def _fatal(self, message: str) -> None:
        raise AssertionError(f"scheduler reported a fatal error: {message}")

    def submit(self, *requests: ValidatedRequest) -> list:
        entries = self.scheduler.submit(list(requests))
        self.entries.extend(entries)
        return entries

    async def _finish(self, timeout: float) -> None:
        self.scheduler.start()
        try:
            async with asyncio.timeout(timeout):
                while not (self.entries and all(e.done for e in self.entries)) or self.scheduler.in_flight:
                    held = self.shards.tokens_held()
                    self.max_running_tokens = max(self.max_running_tokens, held)
                    await asyncio.sleep(0)
        finally:
            await self.scheduler.stop()

    def run(self, timeout: float = 10.0) -> None:
        asyncio.run(self._finish(timeout))


def entry_ids(entries) -> list[int]:
    return [e.id for e in entries]


def decodes_before_prefills(shards: ScriptedShards) -> list[int]:
    """For each Prefill in order, how many Decodes the shards had run before it."""
    counts, decodes = [], 0
    for method, _ids in shards.calls:
        if method == "Decode":
            decodes += 1
        elif method == "Prefill":
            counts.append(decodes)
    return counts


def test_a_long_generation_does_not_keep_a_new_short_request_waiting_more_than_max_waiting_tokens_steps():
    """Fairness: a ratio that is never met still lets a newcomer in after max_waiting_tokens decode steps."""
    arrivals: dict[int, int] = {}

    def on_decode(n: int) -> None:
        if n in (3, 11, 30):
            [entry] = run.submit(request(4, 3))
            arrivals[entry.id] = n

    shards = ScriptedShards(on_decode=on_decode)
    run = Run(shards, max_waiting_tokens=5, waiting_served_ratio=100.0)
    [long] = run.submit(request(8, 60))
    run.run()
    assert long.stop_reason == fmaas.MAX_TOKENS and long.generated == 60
    # Decodes done before each newcomer's prefill, from the call log.
    decodes_before: dict[int, int] = {}
    count = 0
    for method, ids in shards.calls:
        if method == "Decode":
            count += 1
        elif method == "Prefill":
            for rid in ids:
                decodes_before[rid] = count
    assert set(arrivals) <= set(decodes_before)
    for rid, arrived in arrivals.items():
        # It arrived while decode `arrived` was being sent: at most 5 more decodes pass before its prefill.
        waited = decodes_before[rid] - (arrived - 1)
        assert 1 <= waited <= 5, (rid, arrived, decodes_before)
    for entry in run.entries[1:]:
        assert entry.stop_reason == fmaas.MAX_TOKENS and entry.generated == 3
    # The newcomers joined the long one's batch rather than waiting for it to end.
    assert max(shards.decode_sizes()) == 2


def test_fewer_waiting_than_the_served_ratio_wait_max_waiting_tokens_steps():
    """4 running, ratio 0.5: a single waiting request is admitted only max_waiting_tokens steps after the last prefill."""

    def on_decode(n: int) -> None:
        if n == 2:
            run.submit(request(2, 3))

    shards = ScriptedShards(on_decode=on_decode)
    run = Run(shards, max_waiting_tokens=8, waiting_served_ratio=0.5)
    run.submit(*(request(2, 40) for _ in range(4)))
    run.run()
    assert [len(p) for p in shards.prefills()] == [4, 1]
    # As in TGI the prefill's token counts as the first of the max_waiting_tokens steps.
    assert decodes_before_prefills(shards) == [0, 7]
    assert 5 in shards.decode_sizes()


def test_waiting_served_ratio_pair_is_admitted_at_the_next_step_when_it_meets_the_ratio():
    def on_decode(n: int) -> None:
        if n == 3:
            run.submit(request(2, 3), request(2, 3))

    shards = ScriptedShards(on_decode=on_decode)
    run = Run(shards, max_waiting_tokens=50, waiting_served_ratio=0.5)
    run.submit(*(request(2, 30) for _ in range(4)))
    run.run()
    # 2 waiting >= 0.5 * 4 running: prefilled right after the decode during which they arrived.
    assert decodes_before_prefills(shards) == [0, 3]


def test_max_batch_prefill_tokens_splits_waiting_requests_into_prefills_within_the_budget():
    shards = ScriptedShards()
    run = Run(shards, max_batch_prefill_tokens=25, max_waiting_tokens=0)
    run.submit(*(request(10, 4) for _ in range(5)))
    run.run()
    prefills = shards.prefills()
    assert [len(p) for p in prefills] == [2, 2, 1]
    assert all(e.generated == 4 and e.stop_reason == fmaas.MAX_TOKENS for e in run.entries)


def test_a_prompt_over_the_prefill_budget_is_prefilled_in_chunks_while_the_running_requests_decode():
    """Budget 25: a 100-token prompt arriving beside two running requests takes 4 steps to prefill;
    the running ones get a token at every one of them, and nothing else is prefilled meanwhile."""
    late: list = []

    def on_decode(n: int) -> None:
        if n == 2:
            late.extend(run.submit(request(100, 3)))
        if n == 3:
            late.extend(run.submit(request(5, 2)))

    shards = ScriptedShards(on_decode=on_decode)
    run = Run(shards, max_batch_prefill_tokens=25, max_waiting_tokens=0, waiting_served_ratio=0.0)
    first = run.submit(request(10, 12), request(10, 12))
    run.run()
    assert set(shards.chunks) == {25}
    long, short = late
    assert shards.prefills() == [entry_ids(first), [long.id], [short.id]]
    # The long prompt: its Prefill and then three Decode steps hold a chunk each, the running
    # requests decoding in every one; the short one is prefilled only after the last chunk (and
    # the step already sent while that chunk's token was being handled).
    assert decodes_before_prefills(shards)[2] - decodes_before_prefills(shards)[1] == 3 + 1
    assert all(e.generated == e.request.max_new_tokens for e in run.entries)
    assert all(len(ids) >= 2 for method, ids in shards.calls if method == "Decode")


def test_a_first_prompt_over_the_prefill_budget_is_admitted_alone_and_chunked():
    shards = ScriptedShards()
    run = Run(shards, max_batch_prefill_tokens=16, max_waiting_tokens=0)
    run.submit(request(40, 2), request(4, 2))
    run.run()
    assert [len(p) for p in shards.prefills()] == [1, 1]
    assert all(e.generated == 2 for e in run.entries)


def test_max_batch_total_tokens_makes_a_request_that_cannot_fit_now_wait_until_others_finish():
    """Budget 100 tokens (input + max_new): two 40-token requests run, the third waits, none is dropped."""
    shards = ScriptedShards()
    run = Run(shards, max_batch_total_tokens=100, max_waiting_tokens=0, waiting_served_ratio=0.0)
    first = run.submit(request(10, 30), request(10, 30))
    third = run.submit(request(10, 30))
    run.run()
    assert shards.prefills()[0] == entry_ids(first)
    assert max(shards.decode_sizes()) == 2
    assert shards.prefills()[1] == entry_ids(third)
    assert run.max_running_tokens <= 100
    assert all(e.generated == 30 for e in run.entries)


def test_max_batch_total_tokens_counts_whole_kv_blocks():
    """Block size 16: a 10 + 10 token request reserves 32 tokens, so a 63-token budget runs one at a time."""
    shards = ScriptedShards()
    run = Run(shards, max_batch_total_tokens=63, block_size=16, max_waiting_tokens=0, waiting_served_ratio=0.0)
    run.submit(request(10, 10), request(10, 10))
    run.run()
    assert [len(p) for p in shards.prefills()] == [1, 1]
    assert max(shards.decode_sizes()) == 1


def test_max_batch_size_caps_the_running_batch_and_admits_as_requests_finish():
    shards = ScriptedShards()
    run = Run(shards, max_batch_size=3, max_waiting_tokens=0, waiting_served_ratio=0.0)
    run.submit(*(request(3, 5 + i) for i in range(7)))
    run.run()
    assert max(shards.decode_sizes()) <= 3
    assert sum(len(p) for p in shards.prefills()) == 7
    assert all(e.stop_reason == fmaas.MAX_TOKENS for e in run.entries)


def test_cancelled_request_is_filtered_from_the_shards_at_the_next_step_and_the_rest_continue():
    def on_decode(n: int) -> None:
        if n == 4:
            run.scheduler.cancel(victim)

    shards = ScriptedShards(on_decode=on_decode)
    run = Run(shards)
    victim, other = run.submit(request(5, 50), request(5, 20))
    run.run()
    assert victim.stop_reason == fmaas.CANCELLED
    assert other.stop_reason == fmaas.MAX_TOKENS and other.generated == 20
    assert ("FilterBatch", [other.id]) in shards.calls
    assert shards.tokens_held() == 0
    assert run.metrics.batch_current_size._value.get() == 0
