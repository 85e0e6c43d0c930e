"""Batch state between RPCs: per request its ids, KV blocks and sampling/stopping state.

A :class:`Batch` builds the flattened model inputs (ids, positions,
:class:`AttentionMetadata`) of one step: each generating request's last
token, and each prompt not yet in the cache its next tokens (all of them, or
a chunk when the step's prompt tokens are bounded: chunked prefill). A new
request first takes the cached blocks of its prompt's longest cached prefix
(prefix caching), so only the rest is computed. Batches are merged (Decode of
several cached batches) or filtered (requests finished or dropped by the
router). Block allocation for a step is all or nothing: when the cache is
short, :class:`CacheFullError` is raised before any request changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from text_generation_server.engine.kv_cache import (
    BlockAllocator,
    CacheFullError,
    blocks_for_tokens,
    prefix_keys,
)
from text_generation_server.engine.sampler import SampleRow, SamplingParams
from text_generation_server.engine.speculation import NgramIndex
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
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    block_keys: list[bytes] = field(default_factory=list)  # prefix keys of the full blocks so far
    prompt_tokens: list[generate_pb2.Token] = field(default_factory=list)  # prompt logprobs so far
    ngrams: NgramIndex | None = None  # prompt + generated ids, for speculative drafts
    draft: list[int] = field(default_factory=list)  # tokens guessed after the last one, this step

    @property
    def speculates(self) -> bool:
        """Greedy on the raw logits, so a guessed token is kept exactly when greedy would choose it."""
        return not self.sampling.do_sample and self.sampling.repetition_penalty == 1.0

    @property
    def prompt_left(self) -> int:
        return len(self.input_ids) - self.kv_len if not self.generated else 0

    @property
    def total_len(self) -> int:
        return len(self.input_ids) + len(self.generated)

    @property
    def max_tokens(self) -> int:
        """Tokens this request reaches at its max_new_tokens limit."""
        return len(self.input_ids) + self.stopping.params.max_new_tokens

    def sample_row(self, ahead: int = 0) -> SampleRow:
        """The sampler's view of this request for its next token, or (``ahead`` > 0, speculative
        steps of greedy requests) for the token that many guessed tokens later."""
        penalized = self.sampling.repetition_penalty != 1.0
        return SampleRow(
            params=self.sampling,
            generator=self.generator,
            token_ids=self.input_ids + self.generated if penalized else [],
            banned_ids=self.stopping.banned_ids(len(self.generated) + ahead),
            top_n=self.top_n,
        )


@dataclass
class StepInputs:
    """Flattened inputs of one forward and where each sequence's tokens sit in it."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    query_starts: list[int]  # B + 1 offsets into the flattened tokens
    rows: list[RequestState]  # the B requests with tokens in this step, in order
    # Per row, how many of its last tokens' logits choose tokens: 0 for a prompt chunk that is not
    # the last, 1 for a decode row or a prompt's last chunk, 1 + guesses for a speculative row.
    samples: list[int]

    @property
    def sampled(self) -> list[tuple[int, RequestState]]:
        """(row index, request) of the rows that choose tokens."""
        return [(i, r) for i, (r, s) in enumerate(zip(self.rows, self.samples, strict=True)) if s]

    @property
    def logit_indices(self) -> list[int]:
        """Flattened indices of the tokens whose logits are computed, row after row."""
        return [t for i, n in enumerate(self.samples) if n
                for t in range(self.query_starts[i + 1] - n, self.query_starts[i + 1])]


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
        self,
        allocator: BlockAllocator,
        block_size: int,
        rows: list[RequestState],
        new_tokens: list[int],
        what: str,
    ) -> None:
        """Give each of ``rows`` blocks for its ``new_tokens`` more tokens, all or none."""
        needs = [
            max(0, blocks_for_tokens(r.kv_len + n, block_size) - len(r.blocks))
            for r, n in zip(rows, new_tokens, strict=True)
        ]
        total = sum(needs)
        if total > allocator.num_free:
            raise CacheFullError(
                f"KV cache full: this {what} ({len(rows)} requests) needs {total} more "
                f"blocks ({total * block_size} tokens, {sum(new_tokens)} new) but only "
                f"{allocator.num_free} of {allocator.num_usable} blocks "
                f"({allocator.num_free * block_size} of {allocator.num_usable * block_size} tokens) "
                f"are free"
            )
        for r, n in zip(rows, needs, strict=True):
            if n:
                r.blocks.extend(allocator.allocate(n))

    def match_prefixes(self, allocator: BlockAllocator, block_size: int) -> None:
        """Give each new request the cached blocks of its prompt's longest cached prefix.

        Whole blocks only, and never the prompt's last token, whose logits choose the first
        generated token. Requests that asked for their prompt's logprobs compute every token.
        """
        for r in self.requests:
            if r.kv_len or r.generated or r.blocks:
                raise ValueError(f"batch {self.id} was already prefilled")
            r.block_keys = prefix_keys(r.input_ids, block_size)
            if r.prefill_logprobs:
                continue
            usable = (len(r.input_ids) - 1) // block_size
            r.blocks = allocator.match(r.block_keys[:usable])
            r.kv_len = r.cached_tokens = len(r.blocks) * block_size

    def prepare_step(
        self,
        allocator: BlockAllocator,
        block_size: int,
        device: torch.device,
        chunk_tokens: int = 0,
        speculate: int = 0,
    ) -> StepInputs:
        """The next step's inputs: the last token of every request that is generating (followed,
        with ``speculate`` > 0, by up to that many tokens guessed from its earlier text), and of
        every prompt still being prefilled its next tokens, at most ``chunk_tokens`` of them in
        all (0: no bound) given to prompts in batch order. Allocates the blocks they need (a
        prompt's whole at its first chunk), all or none (the caller frees a new batch's blocks on
        failure)."""
        rows: list[RequestState] = []
        samples: list[int] = []
        counts: list[int] = []
        budget = chunk_tokens if chunk_tokens > 0 else None
        for r in self.requests:
            if r.generated:
                if r.kv_len != r.total_len - 1:
                    raise ValueError(f"request {r.id} of batch {self.id} is not ready for a decode step")
                r.draft = []
                if speculate > 0 and r.speculates:
                    if r.ngrams is None:
                        r.ngrams = NgramIndex()
                        r.ngrams.extend(r.input_ids + r.generated)
                    # Never past max_new_tokens: the last token a request may get is checked alone.
                    room = r.stopping.params.max_new_tokens - len(r.generated) - 1
                    r.draft = r.ngrams.draft(min(speculate, room))
                n = 1 + len(r.draft)
            else:
                n = r.prompt_left if budget is None else min(r.prompt_left, budget)
                if budget is not None:
                    budget -= n
                if n == 0:
                    continue  # no room left in this step's chunk: it waits for the next step
            rows.append(r)
            counts.append(n)
            samples.append(n if r.generated else int(n == r.prompt_left))
        if not rows:
            raise ValueError(f"batch {self.id} has nothing to run in this step (chunk of {chunk_tokens} tokens)")
        what = "decode step" if all(r.generated for r in rows) else "prefill"
        # Every request's blocks: a generating one's for this step's tokens, a prompt's whole with
        # the batch's first step (even when this step has no room for it), so later chunks never
        # run short.
        reserve = [r.prompt_left or 1 + len(r.draft) for r in self.requests]
        self._reserve(allocator, block_size, self.requests, reserve, what)
        ids, positions, slots = [], [], []
        for r, n in zip(rows, counts, strict=True):
            tokens = r.input_ids[r.kv_len : r.kv_len + n] if not r.generated else r.generated[-1:] + r.draft
            pos = torch.arange(r.kv_len, r.kv_len + n, dtype=torch.int64)
            blocks = torch.tensor(r.blocks, dtype=torch.int64)
            ids.append(torch.tensor(tokens, dtype=torch.int64))
            positions.append(pos)
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        return self._inputs(
            rows,
            samples,
            torch.cat(ids),
            torch.cat(positions),
            torch.cat(slots),
            counts,
            [r.kv_len + n for r, n in zip(rows, counts, strict=True)],
            device,
        )

    def register_prefixes(self, allocator: BlockAllocator, block_size: int, requests: list[RequestState]) -> None:
        """Offer the full blocks of ``requests`` whose keys and values are all in the cache (prompt
        and generated tokens) to later requests with the same prefix."""
        for r in requests:
            full = min(r.kv_len // block_size, len(r.blocks))
            if len(r.block_keys) < full:
                r.block_keys = prefix_keys((r.input_ids + r.generated)[: full * block_size], block_size, r.block_keys)
            for b in range(full):
                allocator.register(r.blocks[b], r.block_keys[b])

    def _inputs(
        self,
        rows: list[RequestState],
        samples: list[int],
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        query_lens: list[int],
        context_lens: list[int],
        device: torch.device,
    ) -> StepInputs:
        width = max(len(r.blocks) for r in rows)
        tables = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, r in enumerate(rows):
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
        return StepInputs(ids.to(device), positions.to(device), attn, starts, rows, samples)

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
