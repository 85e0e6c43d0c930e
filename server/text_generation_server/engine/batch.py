"""Batch state between RPCs: per request its ids, KV blocks and sampling/stopping state.

A :class:`Batch` builds the flattened model inputs (ids, positions,
:class:`AttentionMetadata`) for a prefill or a decode step, and is merged
with other batches (Decode of several cached batches) or filtered (requests
finished or dropped by the router). Block allocation for a step is all or
nothing: when the cache is short, :class:`CacheFullError` is raised before
any request changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from text_generation_server.engine.kv_cache import (
    BlockAllocator,
    CacheFullError,
    blocks_for_tokens,
)
from text_generation_server.engine.sampler import SampleRow, SamplingParams
from text_generation_server.engine.stopping import StoppingCriteria, StoppingParams
from text_generation_server.layers.attention import AttentionMetadata
from text_generation_server.pb.generate.v1 import generate_pb2


@dataclass
class RequestState:
    id: int
    input_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingCriteria
    top_n: int = 0
    prefill_logprobs: bool = False
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    kv_len: int = 0  # tokens whose keys/values are in the cache

    @property
    def total_len(self) -> int:
        return len(self.input_ids) + len(self.generated)

    @property
    def max_tokens(self) -> int:
        """Tokens this request reaches at its max_new_tokens limit."""
        return len(self.input_ids) + self.stopping.params.max_new_tokens

    def sample_row(self) -> SampleRow:
        penalized = self.sampling.repetition_penalty != 1.0
        return SampleRow(
            params=self.sampling,
            generator=self.generator,
            token_ids=self.input_ids + self.generated if penalized else [],
            banned_ids=self.stopping.banned_ids(len(self.generated)),
            top_n=self.top_n,
        )


@dataclass
class StepInputs:
    """Flattened inputs of one forward and where each sequence's tokens sit in it."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    query_starts: list[int]  # B + 1 offsets into the flattened tokens

    @property
    def last_indices(self) -> list[int]:
        return [end - 1 for end in self.query_starts[1:]]


def request_from_pb(
    pb: generate_pb2.Request, eos_token_ids: list[int], vocab_size: int, device: torch.device
) -> RequestState:
    """Validate one ``generate.v1.Request``; ``ValueError`` names the request and the field."""
    ids = [int(t) for t in pb.input_ids]
    if not ids:
        raise ValueError(f"request {pb.id} has no input_ids; at least one token is needed")
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise ValueError(
            f"request {pb.id} has input ids outside the vocabulary of {vocab_size}: {bad[:5]}"
        )
    try:
        sampling = SamplingParams.from_pb(pb.sampling)
        stopping = StoppingParams.from_pb(pb.stopping)
    except ValueError as e:
        raise ValueError(f"request {pb.id}: {e}") from None
    return RequestState(
        id=int(pb.id),
        input_ids=ids,
        sampling=sampling,
        stopping=StoppingCriteria(stopping, eos_token_ids),
        top_n=int(pb.top_n_tokens),
        prefill_logprobs=bool(pb.prefill_logprobs),
        generator=sampling.make_generator(device),
    )


class Batch:
    """Requests that advance together; ``id`` is the router's batch id."""

    def __init__(self, batch_id: int, requests: list[RequestState]) -> None:
        self.id = batch_id
        self.requests = requests

    @classmethod
    def from_pb(
        cls,
        pb: generate_pb2.Batch,
        eos_token_ids: list[int],
        vocab_size: int,
        device: torch.device,
    ) -> Batch:
        if not pb.requests:
            raise ValueError(f"batch {pb.id} has no requests")
        seen: set[int] = set()
        for r in pb.requests:
            if r.id in seen:
                raise ValueError(f"batch {pb.id} lists request {r.id} twice")
            seen.add(r.id)
        return cls(
            int(pb.id), [request_from_pb(r, eos_token_ids, vocab_size, device) for r in pb.requests]
        )

    # ---- facts for the router -------------------------------------------------------

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    @property
    def current_tokens(self) -> int:
        return sum(r.kv_len for r in self.requests)

    @property
    def max_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def to_pb(self) -> generate_pb2.CachedBatch:
        return generate_pb2.CachedBatch(
            id=self.id,
            request_ids=self.request_ids,
            size=len(self.requests),
            current_tokens=self.current_tokens,
            max_tokens=self.max_tokens,
        )

    # ---- step inputs ----------------------------------------------------------------

    def _reserve(
        self, allocator: BlockAllocator, block_size: int, new_tokens: list[int], what: str
    ) -> None:
        """Give every request blocks for ``new_tokens`` more tokens, all or none."""
        needs = [
            max(0, blocks_for_tokens(r.kv_len + n, block_size) - len(r.blocks))
            for r, n in zip(self.requests, new_tokens, strict=True)
        ]
        total = sum(needs)
        if total > allocator.num_free:
            raise CacheFullError(
                f"KV cache full: this {what} ({len(self.requests)} requests) needs {total} more "
                f"blocks ({total * block_size} tokens, {sum(new_tokens)} new) but only "
                f"{allocator.num_free} of {allocator.num_usable} blocks "
                f"({allocator.num_free * block_size} of {allocator.num_usable * block_size} tokens) "
                f"are free"
            )
        for r, n in zip(self.requests, needs, strict=True):
            if n:
                r.blocks.extend(allocator.allocate(n))

    def prepare_prefill(
        self, allocator: BlockAllocator, block_size: int, device: torch.device
    ) -> StepInputs:
        """Every prompt in full; allocates their blocks (the caller frees them on failure)."""
        if any(r.kv_len or r.generated for r in self.requests):
            raise ValueError(f"batch {self.id} was already prefilled")
        self._reserve(allocator, block_size, [len(r.input_ids) for r in self.requests], "prefill")
        ids, positions, slots = [], [], []
        for r in self.requests:
            n = len(r.input_ids)
            pos = torch.arange(n, dtype=torch.int64)
            blocks = torch.tensor(r.blocks, dtype=torch.int64)
            ids.append(torch.tensor(r.input_ids, dtype=torch.int64))
            positions.append(pos)
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        lens = [len(r.input_ids) for r in self.requests]
        return self._inputs(
            torch.cat(ids), torch.cat(positions), torch.cat(slots), lens, lens, device
        )

    def prepare_decode(
        self, allocator: BlockAllocator, block_size: int, device: torch.device
    ) -> StepInputs:
        """Each request's last token; allocates a block for requests that filled theirs."""
        for r in self.requests:
            if not r.generated or r.kv_len != r.total_len - 1:
                raise ValueError(
                    f"request {r.id} of batch {self.id} is not ready for a decode step"
                )
        self._reserve(allocator, block_size, [1] * len(self.requests), "decode step")
        pos = [r.kv_len for r in self.requests]
        slots = [
            r.blocks[p // block_size] * block_size + p % block_size
            for r, p in zip(self.requests, pos, strict=True)
        ]
        return self._inputs(
            torch.tensor([r.generated[-1] for r in self.requests], dtype=torch.int64),
            torch.tensor(pos, dtype=torch.int64),
            torch.tensor(slots, dtype=torch.int64),
            [1] * len(self.requests),
            [p + 1 for p in pos],
            device,
        )

    def _inputs(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        query_lens: list[int],
        context_lens: list[int],
        device: torch.device,
    ) -> StepInputs:
        width = max(len(r.blocks) for r in self.requests)
        tables = torch.zeros((len(self.requests), width), dtype=torch.int64)
        for i, r in enumerate(self.requests):
            tables[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int64)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        attn = AttentionMetadata(
            slot_mapping=slots.to(device),
            block_tables=tables.to(device),
            context_lens=torch.tensor(context_lens, dtype=torch.int64, device=device),
            query_lens=list(query_lens),
        )
        return StepInputs(ids.to(device), positions.to(device), attn, starts)

    # ---- merge / filter -------------------------------------------------------------

    @classmethod
    def concatenate(cls, batches: list[Batch], batch_id: int | None = None) -> Batch:
        """One batch holding the requests of ``batches`` in order, with the first batch's id."""
        if not batches:
            raise ValueError("no batches to merge")
        requests = [r for b in batches for r in b.requests]
        return cls(batches[0].id if batch_id is None else batch_id, requests)

    def filter(self, keep_ids: set[int]) -> list[RequestState]:
        """Keep the requests in ``keep_ids`` (order preserved); return the dropped ones."""
        dropped = [r for r in self.requests if r.id not in keep_ids]
        self.requests = [r for r in self.requests if r.id in keep_ids]
        return dropped

    def free(self, allocator: BlockAllocator, requests: list[RequestState] | None = None) -> None:
        """Return the KV blocks of ``requests`` (default: all of this batch's)."""
        for r in self.requests if requests is None else requests:
            if r.blocks:
                allocator.free(r.blocks)
                r.blocks = []
