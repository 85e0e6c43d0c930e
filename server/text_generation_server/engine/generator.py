"""The shard's engine: runs the router's Prefill / Decode / FilterBatch / ClearCache.

Every rank executes the same calls in the same order; everything here that
decides anything (block allocation, cache size, sampling) is deterministic
given the calls, so all ranks stay in lockstep and the collectives inside the
model line up. Cached batches live in :attr:`Generator.batches` between calls.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterable

import torch
from loguru import logger

from text_generation_server.distributed import Distributed
from text_generation_server.engine.batch import Batch, RequestState, StepInputs
from text_generation_server.engine.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    BlockAllocator,
    CacheFullError,
    KVCache,
    _gib,
    blocks_for_memory,
    blocks_for_tokens,
    bytes_per_block,
    cuda_cache_budget,
    cuda_memory_fraction,
    default_num_blocks,
)
from text_generation_server.engine.sampler import SampledToken, sample, token_stats
from text_generation_server.engine.stopping import NOT_FINISHED
from text_generation_server.engine.stopping import eos_token_ids as config_eos_token_ids
from text_generation_server.execution import ModulePlan
from text_generation_server.layers.attention import AttentionMetadata
from text_generation_server.models.base import CausalLM
from text_generation_server.pb.generate.v1 import generate_pb2

StepResult = tuple[
    list[generate_pb2.Generation], generate_pb2.CachedBatch | None, generate_pb2.Timings
]


class BatchNotFoundError(LookupError):
    """The router named a batch this shard does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "batch not found"


class Generator:
    """One rank's model plus its KV cache and cached batches."""

    def __init__(
        self,
        model: CausalLM,
        dist: Distributed,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        model_id: str = "",
        quantize: str | None = None,
        eos_token_ids: Iterable[int] | None = None,
        num_blocks: int | None = None,
        logits_chunk_rows: int = 512,
        prefix_caching: bool = False,
        speculate: int = 0,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        # The KV cache's element type: the compute dtype unless --kv-cache-dtype says otherwise.
        self.kv_dtype = kv_dtype or model.dtype
        # The execution plan load_model chose; a model built without it runs on its modules.
        self.plan = getattr(model, "plan", None) or ModulePlan(model)
        self.dist = dist
        self.block_size = block_size
        self.model_id = model_id
        self.quantize = quantize or ""
        config = model.config
        self.eos_token_ids = (
            list(eos_token_ids) if eos_token_ids is not None else config_eos_token_ids(config)
        )
        self.max_position_embeddings = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.logits_chunk_rows = max(1, logits_chunk_rows)
        # Full KV blocks of earlier prompts (and generations) reused by requests with the same prefix.
        self.prefix_caching = prefix_caching
        # Greedy requests guess up to this many tokens per step from their own text (n-gram drafts).
        self.speculate = max(0, speculate)
        self.speculated = 0  # guessed tokens checked, and those kept
        self.accepted = 0
        self.batches: dict[int, Batch] = {}
        self.cache: KVCache | None = None
        self.allocator: BlockAllocator | None = None
        self._allocate_cache(
            num_blocks or default_num_blocks(self.max_position_embeddings or 4096, block_size)
        )

    # ---- cache ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def _allocate_cache(self, num_blocks: int) -> None:
        m = self.model
        self.cache = KVCache(
            m.num_layers,
            num_blocks,
            self.block_size,
            m.num_kv_heads,
            m.head_dim,
            self.kv_dtype,
            self.device,
        )
        self.allocator = BlockAllocator(num_blocks)
        logger.info(
            f"KV cache: {num_blocks - 1} blocks of {self.block_size} tokens in {str(self.kv_dtype).removeprefix('torch.')} "
            f"({self.cache.capacity_tokens} tokens, {self.cache.nbytes / 2**20:.1f} MiB) on {self.device}"
        )

    def _release_cache(self) -> None:
        self.cache = None
        self.allocator = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def kv_usage(self) -> generate_pb2.KvCacheUsage:
        """Blocks in use and usable blocks of the KV cache right now."""
        if self.allocator is None:
            return generate_pb2.KvCacheUsage()
        total = self.allocator.num_usable
        return generate_pb2.KvCacheUsage(
            blocks_used=total - self.allocator.num_free,
            blocks_total=total,
            blocks_cached=self.allocator.num_cached,
        )

    def _agree_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks, so every rank sizes its cache the same."""
        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        return int(self.dist.all_gather(t, dim=0).min())

    # ---- RPCs -----------------------------------------------------------------------

    def info(self) -> generate_pb2.InfoResponse:
        config = self.model.config
        archs = getattr(config, "architectures", None) or [type(self.model).__name__]
        return generate_pb2.InfoResponse(
            model_id=self.model_id,
            architecture=archs[0],
            dtype=str(self.model.dtype).removeprefix("torch."),
            device_type=self.device.type,
            quantize=self.quantize,
            world_size=self.dist.world_size,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=int(self.model.vocab_size),
            eos_token_ids=self.eos_token_ids,
            block_size=self.block_size,
            kernel=str(getattr(self.model, "kernel", "")),
            prefix_caching=self.prefix_caching,
        )

    def health(self) -> None:
        """Raise if the model cannot run a forward.

        Only a single shard with nothing cached runs the tiny forward: with
        several ranks a forward is a collective, and health probes do not
        arrive in lockstep.
        """
        if self.dist.world_size > 1 or self.batches:
            return
        assert self.allocator is not None and self.cache is not None
        blocks = self.allocator.allocate(1)
        try:
            attn = AttentionMetadata(
                slot_mapping=torch.tensor([blocks[0] * self.block_size], device=self.device),
                block_tables=torch.tensor([blocks], dtype=torch.int64, device=self.device),
                context_lens=torch.tensor([1], dtype=torch.int64, device=self.device),
                query_lens=[1],
            )
            with torch.inference_mode():
                ids = torch.zeros(1, dtype=torch.int64, device=self.device)
                hidden = self.plan.forward(ids, torch.zeros_like(ids), self.cache.layers, attn)
                logits = self.plan.compute_logits(hidden)
            if not bool(torch.isfinite(logits).all()):
                raise RuntimeError("the model produced non-finite logits in the health check")
        finally:
            self.allocator.free(blocks)

    def clear_cache(self, batch_id: int | None = None) -> None:
        """Drop one cached batch (unknown ids are ignored) or all of them."""
        assert self.allocator is not None
        ids = list(self.batches) if batch_id is None else [batch_id]
        for i in ids:
            batch = self.batches.pop(i, None)
            if batch is not None:
                self._free(batch)
        logger.debug(f"Cleared batches {ids}; {self.allocator.num_free} blocks free")

    def filter_batch(self, batch_id: int, keep_ids: Iterable[int]) -> generate_pb2.CachedBatch:
        """Keep only ``keep_ids`` of batch ``batch_id``, freeing the others' KV blocks."""
        assert self.allocator is not None
        batch = self._get(batch_id)
        keep = set(int(i) for i in keep_ids)
        unknown = keep.difference(batch.request_ids)
        if unknown:
            logger.warning(
                f"FilterBatch {batch_id}: requests {sorted(unknown)} are not in the batch "
                f"(already finished?); keeping the others"
            )
        dropped = batch.filter(keep)
        self._free(batch, dropped)
        if not batch.requests:
            del self.batches[batch_id]
        return batch.to_pb()

    def prefill(self, pb_batch: generate_pb2.Batch, chunk_tokens: int = 0) -> StepResult:
        """Run the prompts of a new batch and choose each request's first token.

        With ``chunk_tokens`` > 0 at most that many prompt tokens run (in batch order): a prompt
        that does not fit gets no token yet and continues in the following :meth:`decode` steps."""
        start = time.perf_counter_ns()
        assert self.allocator is not None
        if pb_batch.id in self.batches:
            raise ValueError(f"batch {pb_batch.id} already exists; clear it or use a new id")
        batch = Batch.from_pb(pb_batch, self.eos_token_ids, int(self.model.vocab_size), self.device)
        held = {rid for b in self.batches.values() for rid in b.request_ids}
        clash = held.intersection(batch.request_ids)
        if clash:
            raise ValueError(f"requests {sorted(clash)} are already in a cached batch")
        try:
            if self.prefix_caching:
                batch.match_prefixes(self.allocator, self.block_size)
            inputs = batch.prepare_step(self.allocator, self.block_size, self.device, chunk_tokens)
            return self._step(batch, inputs, start)
        except BaseException:
            if batch.id not in self.batches:
                batch.free(self.allocator)
            raise

    def decode(self, cached: Iterable[generate_pb2.CachedBatch], chunk_tokens: int = 0) -> StepResult:
        """Merge the named batches into the first one's id and advance every request one token;
        prompts still being prefilled advance by their next chunk (at most ``chunk_tokens`` in all,
        0: the rest of every prompt)."""
        start = time.perf_counter_ns()
        assert self.allocator is not None
        ids = [int(b.id) for b in cached]
        if not ids:
            raise ValueError("Decode needs at least one batch")
        if len(set(ids)) != len(ids):
            raise ValueError(f"Decode lists a batch twice: {ids}")
        batches = [self._get(i) for i in ids]
        merged = Batch.concatenate(batches)
        inputs = merged.prepare_step(self.allocator, self.block_size, self.device, chunk_tokens, self.speculate)
        for i in ids:
            del self.batches[i]
        self.batches[merged.id] = merged
        return self._step(merged, inputs, start)

    def warmup(self, request: generate_pb2.WarmupRequest) -> generate_pb2.WarmupResponse:
        """Size the KV cache, then run (and drop) a maximal prefill and one decode step."""
        if self.batches:
            logger.info(f"Warmup drops {len(self.batches)} cached batches")
        self.clear_cache(None)
        bs = self.block_size
        warm = request.batch
        # The warmup batch must fit: its prompts plus one decode token each.
        min_tokens = sum(blocks_for_tokens(len(r.input_ids) + 1, bs) for r in warm.requests) * bs
        max_total = int(request.max_total_tokens) or self.max_position_embeddings or 4096
        min_tokens = max(min_tokens, max_total)
        previous_blocks = self.cache.num_blocks if self.cache is not None else None
        self._release_cache()
        m = self.model
        error: CacheFullError | None = None
        try:
            if self.device.type == "cuda" and not request.max_batch_total_tokens:
                num_blocks = self._cuda_blocks_after_peak(warm, min_tokens)
            else:
                num_blocks = blocks_for_memory(
                    num_layers=m.num_layers,
                    num_kv_heads=m.num_kv_heads,
                    head_dim=m.head_dim,
                    dtype=self.kv_dtype,
                    device=self.device,
                    block_size=bs,
                    max_batch_total_tokens=int(request.max_batch_total_tokens),
                    max_total_tokens=max_total,
                    min_tokens=min_tokens,
                    world_size=self.dist.world_size,
                )
        except CacheFullError as e:
            error, num_blocks = e, 0
        # Every rank must agree (and fail together), or the next collective would hang.
        num_blocks = self._agree_min(num_blocks)
        if num_blocks == 0:
            # Keep serving with the cache we had rather than with none.
            self._allocate_cache(previous_blocks or default_num_blocks(max_total, bs))
            raise error or CacheFullError(
                "another shard has no memory for its KV cache; see its log"
            )
        self._allocate_cache(num_blocks)
        if warm.requests:
            started = time.perf_counter()
            try:
                _, cached, _ = self.prefill(warm)
                if cached is not None:
                    self.decode([cached])
            finally:
                self.clear_cache(None)
            logger.info(
                f"Warmup prefill of {len(warm.requests)} requests "
                f"({sum(len(r.input_ids) for r in warm.requests)} tokens) and one decode step "
                f"took {time.perf_counter() - started:.2f}s"
            )
        usable = num_blocks - 1
        return generate_pb2.WarmupResponse(
            max_supported_total_tokens=usable * bs, num_blocks=usable, block_size=bs
        )

    def _cuda_blocks_after_peak(self, warm: generate_pb2.Batch, min_tokens: int) -> int:
        """A GPU shard's cache size, after the warm-up batch has run on a cache just big enough
        for it: the memory the activations of a maximal prefill peaked at stays free."""
        bs, m, device = self.block_size, self.model, self.device
        per_block = bytes_per_block(m.num_layers, bs, m.num_kv_heads, m.head_dim, self.kv_dtype)
        probe = blocks_for_tokens(min_tokens, bs) + 1
        self._allocate_cache(probe)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            if warm.requests:
                _, cached, _ = self.prefill(warm)
                if cached is not None:
                    self.decode([cached])
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError as e:
            raise CacheFullError(
                f"the warm-up prefill ({sum(len(r.input_ids) for r in warm.requests)} tokens) does not fit on "
                f"{device} beside the weights: lower --max-batch-prefill-tokens or use more shards ({e})"
            ) from None
        finally:
            self.clear_cache(None)
            self._release_cache()
        activations = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        fraction = cuda_memory_fraction()
        budget = cuda_cache_budget(total=total, free=free, reserved=reserved, activations=activations,
                                   fraction=fraction)  # fmt: skip
        blocks = budget // per_block
        needed = blocks_for_tokens(min_tokens, bs)
        if blocks - 1 < needed:
            raise CacheFullError(
                f"not enough memory on {device} for the KV cache: {_gib(total)} in all, {fraction:.0%} usable "
                f"(--cuda-memory-fraction), {_gib(reserved)} held by the weights, {_gib(activations)} by a "
                f"maximal prefill's activations, {_gib(free)} free: {max(blocks - 1, 0) * bs} tokens fit but "
                f"{needed * bs} are needed; lower --max-batch-prefill-tokens or --max-total-tokens"
            )
        logger.info(
            f"KV cache sized after the warm-up peak on {device}: {_gib(total)} in all, {fraction:.0%} usable, "
            f"weights {_gib(reserved)}, prefill activations {_gib(activations)}: {(blocks - 1) * bs} tokens "
            f"({_gib(blocks * per_block)})"
        )
        return blocks

    # ---- internals ------------------------------------------------------------------

    def _get(self, batch_id: int) -> Batch:
        batch = self.batches.get(int(batch_id))
        if batch is None:
            held = sorted(self.batches)
            raise BatchNotFoundError(f"batch {batch_id} not found; cached batches: {held}")
        return batch

    def _free(self, batch: Batch, requests: list[RequestState] | None = None) -> None:
        """Free the KV blocks of ``requests`` (default: all of ``batch``'s), first offering their
        full blocks to the prefix cache."""
        assert self.allocator is not None
        if self.prefix_caching:
            batch.register_prefixes(self.allocator, self.block_size, batch.requests if requests is None else requests)
        batch.free(self.allocator, requests)

    def _step(self, batch: Batch, inputs: StepInputs, start_ns: int) -> StepResult:
        assert self.cache is not None and self.allocator is not None
        sampled = inputs.sampled
        with torch.inference_mode():
            forward_start = time.perf_counter_ns()
            hidden = self.plan.forward(inputs.input_ids, inputs.positions, self.cache.layers, inputs.attn)
            logits = None
            if sampled:
                rows = torch.tensor(inputs.logit_indices, device=hidden.device)
                logits = self.plan.compute_logits(hidden[rows])
            self._prompt_logprobs(inputs, hidden)
            forward_ns = time.perf_counter_ns() - forward_start
            sample_rows = [r.sample_row(ahead) for i, r in sampled for ahead in range(inputs.samples[i])]
            chosen = sample(logits, sample_rows) if logits is not None else []
        prompt_rows = [r for r in inputs.rows if not r.generated]
        for r, context_len in zip(inputs.rows, inputs.attn.context_lens_list, strict=True):
            r.kv_len = context_len
        if self.prefix_caching and prompt_rows:
            batch.register_prefixes(self.allocator, self.block_size, prompt_rows)
        generations = []
        finished: list[RequestState] = []
        at = 0
        for i, r in sampled:
            tokens = chosen[at : at + inputs.samples[i]]
            at += inputs.samples[i]
            # A speculative row keeps the chosen tokens while each guess was what greedy chose: the
            # token after a correct guess was computed on the right context; after a wrong one, not.
            kept = 1
            while kept < len(tokens) and r.draft[kept - 1] == tokens[kept - 1].id:
                kept += 1
            for token in tokens[:kept]:
                r.generated.append(token.id)
                reason = r.stopping.check(token.id, len(r.generated))
                generations.append(self._generation(r, token, reason))
                if reason != NOT_FINISHED:
                    finished.append(r)
                    break
            if r.draft:
                # Keys/values are right up to the last correct guess; the rest are overwritten later.
                r.kv_len = r.total_len - 1
                self.speculated += len(r.draft)
                self.accepted += kept - 1
            if r.ngrams is not None:
                r.ngrams.extend(r.generated[len(r.ngrams.tokens) - len(r.input_ids) :])
        if finished:
            self._free(batch, finished)
            batch.filter({r.id for r in batch.requests} - {r.id for r in finished})
        cached = None
        if batch.requests:
            self.batches[batch.id] = batch
            cached = batch.to_pb()
        else:
            self.batches.pop(batch.id, None)
        timings = generate_pb2.Timings(
            forward_ns=forward_ns, total_ns=time.perf_counter_ns() - start_ns
        )
        chunked = sum(1 for r in prompt_rows if not r.generated)
        logger.debug(
            f"{'Prefill' if prompt_rows else 'Decode'} step of batch {batch.id}: {len(inputs.rows)} requests "
            f"({len(prompt_rows)} prompts{f', {chunked} not finished' if chunked else ''}), "
            f"{inputs.input_ids.numel()} tokens, {len(finished)} finished, "
            f"{forward_ns / 1e6:.1f} ms forward, {self.allocator.num_free} blocks free"
            + (f", guessed tokens kept so far {self.accepted}/{self.speculated}" if self.speculate else "")
        )
        return generations, cached, timings

    def _prompt_logprobs(self, inputs: StepInputs, hidden: torch.Tensor) -> None:
        """Logprob and rank of every prompt token this step computed the logits before, for requests
        that asked; gathered in ``RequestState.prompt_tokens`` until their first generation."""
        rows: list[int] = []
        targets: list[int] = []
        asked: list[tuple[RequestState, int, int]] = []  # request, first position, tokens scored
        for i, r in enumerate(inputs.rows):
            if r.generated or not r.prefill_logprobs:
                continue
            n = inputs.attn.query_lens[i]
            first = inputs.attn.context_lens_list[i] - n  # position of the step's first token
            scored = min(first + n, len(r.input_ids) - 1) - first  # positions whose next token is known
            rows.extend(range(inputs.query_starts[i], inputs.query_starts[i] + scored))
            targets.extend(r.input_ids[first + 1 : first + 1 + scored])
            asked.append((r, first, scored))
        if not asked:
            return
        logprobs: list[float] = []
        ranks: list[int] = []
        # Chunked so a long prompt never materialises [prompt_len, vocab] logits at once.
        for c in range(0, len(rows), self.logits_chunk_rows):
            idx = torch.tensor(rows[c : c + self.logits_chunk_rows], device=hidden.device)
            tgt = torch.tensor(targets[c : c + self.logits_chunk_rows], device=hidden.device)
            lp = torch.log_softmax(self.plan.compute_logits(hidden[idx]).float(), dim=-1)
            values, rank, _, _ = token_stats(lp, tgt)
            logprobs.extend(values.tolist())
            ranks.extend(rank.tolist())
        k = 0
        for r, first, scored in asked:
            if first == 0:
                r.prompt_tokens.append(generate_pb2.Token(id=r.input_ids[0], logprob=math.nan, rank=0))
            for t in r.input_ids[first + 1 : first + 1 + scored]:
                r.prompt_tokens.append(generate_pb2.Token(id=t, logprob=logprobs[k], rank=ranks[k]))
                k += 1

    @staticmethod
    def _generation(r: RequestState, token: SampledToken, reason: int) -> generate_pb2.Generation:
        first = len(r.generated) == 1
        prefill_tokens, r.prompt_tokens = (r.prompt_tokens, []) if first else ([], r.prompt_tokens)
        return generate_pb2.Generation(
            request_id=r.id,
            prefill_tokens=prefill_tokens,
            token=generate_pb2.Token(
                id=token.id,
                logprob=token.logprob,
                rank=token.rank,
                top_tokens=[generate_pb2.TopToken(id=i, logprob=lp) for i, lp in token.top_tokens],
            ),
            finish_reason=reason,
            generated_tokens=len(r.generated),
            seed=r.sampling.seed,
            cached_tokens=r.cached_tokens if first else 0,
        )
