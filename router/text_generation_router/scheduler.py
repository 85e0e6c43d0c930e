"""Continuous batching: the loop that drives the shards.

One background task owns the running batch. While it runs, the loop decodes
it one token per step, and between steps admits waiting requests with a
Prefill of their own, then decodes both together (Decode merges them), as
TGI does. Requests the router stops (stop sequence, time limit, cancel) are
dropped from the shards' KV cache with FilterBatch before the next step;
requests the shard stops come back already removed.

Admission follows TGI: a new prefill must fit ``max_batch_prefill_tokens``
and, with the running requests' input + max_new_tokens, the
``max_batch_total_tokens`` budget. While a batch is running, waiting
requests are admitted only when there are at least ``waiting_served_ratio``
times as many as running ones, or when ``max_waiting_tokens`` steps passed
since the last prefill, so decoding is not interrupted for every arrival.
A prefill the shard refuses for lack of KV memory (RESOURCE_EXHAUSTED) goes
back to the head of the queue and is retried once some request finished.

A step holds at most ``max_batch_prefill_tokens`` prompt tokens: a longer
prompt is prefilled in chunks, its first in the Prefill and the rest in the
Decode steps that follow, beside the running requests' tokens (chunked
prefill), so running streams keep their pace while it arrives. No other
prefill starts until its last chunk ran.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import grpc
from loguru import logger
from text_generation_server.pb.fmaas import generation_pb2 as fmaas
from text_generation_server.pb.generate.v1 import generate_pb2

from .config import Limits
from .entry import Entry
from .metrics import RouterMetrics
from .request import ValidatedRequest
from .shard_client import ShardClient, ShardError
from .tokenization import Tokenizer
from .waiting_queue import WaitingQueue

# How a shard names the request a refusal is about (engine.batch.request_from_pb).
_REQUEST_AT_FAULT = re.compile(r"request (\d+): ")


class Scheduler:
    """Queue plus batching loop. ``submit`` and ``cancel`` are called from RPC handlers."""

    def __init__(
        self,
        client: ShardClient,
        tokenizer: Tokenizer,
        limits: Limits,
        metrics: RouterMetrics,
        on_fatal: Callable[[str], None],
    ) -> None:
        self._client = client
        self._tokenizer = tokenizer
        self._limits = limits
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._queue = WaitingQueue(limits.block_size)
        self._running: dict[int, Entry] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._next_request_id = 1
        self._next_batch_id = 1
        # After a RESOURCE_EXHAUSTED prefill: no new prefill until a request finishes,
        # and (when nothing was running) smaller prefills.
        self._prefill_blocked = False
        self._prefill_cap: int | None = None
        self.failed: str | None = None
        self._prompt_tokens = 0  # prompt tokens prefilled, and those the prefix cache held
        self._reused_tokens = 0

    # ---- called by the servicer -------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests waiting or generating."""
        return len(self._queue) + len(self._running)

    def start(self) -> None:
        self._update_gauges()  # the KV cache size is known from the last call (ClearCache after Warmup)
        self._task = asyncio.create_task(self._run(), name="batching-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def submit(
        self, requests: list[ValidatedRequest], *, kind: str = "single", api: str = "grpc", correlation_id: str = ""
    ) -> list[Entry]:
        """Queue requests (together, so they can share a prefill); returns their entries.

        ``kind`` (single, batch, stream) and ``api`` (grpc, http, openai) label the metrics;
        ``correlation_id`` (the client's x-correlation-id) appears in every log line about them.
        """
        now = time.monotonic()
        entries = []
        for request in requests:
            entries.append(
                Entry(
                    self._next_request_id, request, self._tokenizer, now, kind=kind, api=api, correlation_id=correlation_id
                )
            )
            self._next_request_id += 1
            self._metrics.request_input_length.observe(request.input_length)
            self._metrics.request_max_new_tokens.observe(request.max_new_tokens)
        self._queue.push(entries)
        self._update_gauges()
        self._wake.set()
        return entries

    def cancel(self, entry: Entry, *, cause: str = "cancelled", why: str = "by the client") -> None:
        """The client went away (or stopped reading): end the request now; its KV is freed at the next step.

        ``cause`` labels tgi_request_failure; ``why`` ends the log line.
        """
        if entry.done:
            return
        entry.cancelled = True
        self._queue.remove(entry)
        self._running.pop(entry.id, None)
        entry.finish(fmaas.CANCELLED)
        self._metrics.request_failure.labels(err=cause, api=entry.api).inc()
        entry.log.info(f"{entry.label} cancelled {why} after {entry.generated} token(s)")
        self._request_finished()
        self._wake.set()

    def cancel_all(self) -> None:
        """End every queued and running request with CANCELLED (shutdown grace period over)."""
        for entry in self._queue.drain() + list(self._running.values()):
            entry.cancelled = True
            self._running.pop(entry.id, None)
            entry.finish(fmaas.CANCELLED)
            entry.log.warning(f"{entry.label} cancelled by shutdown after {entry.generated} token(s)")
        self._update_gauges()
        self._wake.set()

    # ---- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._wait_for_work()
                await self._serve_one_batch()
        except asyncio.CancelledError:
            raise
        except ShardError as err:
            self._fatal(str(err))
        except Exception as err:  # a bug here would otherwise leave every request hanging
            logger.exception("Batching loop crashed")
            self._fatal(f"batching loop crashed: {type(err).__name__}: {err}")

    async def _wait_for_work(self) -> None:
        while True:
            self._expire_waiting()
            if len(self._queue):
                return
            self._wake.clear()
            await self._wake.wait()

    async def _serve_one_batch(self) -> None:
        """Prefill what is waiting, then decode until every request of the batch is done.

        Decode steps are pipelined: when no prefill is due, step n + 1 is sent as soon
        as step n's answer arrives and step n's tokens are handled (streamed, stop
        sequences checked) while the shards compute. A request the router stops on
        step n's token has then had one more token computed, which is dropped, and
        leaves the shards' cache before the step after.
        """
        limits = self._limits
        batch = self._queue.next_batch(
            min_size=None,
            max_size=self._admission_cap(0),
            prefill_token_budget=limits.max_batch_prefill_tokens,
            token_budget=limits.max_batch_total_tokens,
            admit_first_anyway=True,
        )
        if batch is None:
            return
        cached = await self._prefill(batch)
        waiting_steps = 1
        pending: asyncio.Task | None = None
        try:
            while True:
                if pending is None:
                    if not cached:
                        break
                    batches = list(cached)
                    self._expire_waiting()
                    if len(self._queue) and not self._prefill_blocked and not self._chunking():
                        running = len(self._running)
                        min_size = None if waiting_steps >= limits.max_waiting_tokens else int(running * limits.waiting_served_ratio)
                        new = self._queue.next_batch(
                            min_size=min_size,
                            max_size=self._admission_cap(running),
                            prefill_token_budget=limits.max_batch_prefill_tokens,
                            token_budget=limits.max_batch_total_tokens - self._running_tokens(),
                        )
                        if new is not None:
                            batches += await self._prefill(new)
                            waiting_steps = 1
                    pending = asyncio.create_task(self._decode(batches))
                    waiting_steps += 1
                answer = await pending
                pending = None
                if answer is None:
                    cached = []
                    continue
                cached = [answer.batch] if answer.HasField("batch") else []
                if cached and not self._prefill_may_be_due(waiting_steps):
                    pending = asyncio.create_task(self._decode(cached))
                    waiting_steps += 1
                    await asyncio.sleep(0)  # let the step go out before this one's tokens are handled
                self._process(answer.generations)
        finally:
            if pending is not None:
                pending.cancel()
                try:
                    await pending
                except (asyncio.CancelledError, ShardError):
                    pass
        self._update_gauges()

    def _prefill_may_be_due(self, waiting_steps: int) -> bool:
        """Whether admission might take waiting requests before the next step (then the step
        waits for this one's tokens to be handled, and admission sees the result)."""
        if not len(self._queue) or self._prefill_blocked or self._chunking():
            return False
        if waiting_steps >= self._limits.max_waiting_tokens:
            return True
        return len(self._queue) >= int(len(self._running) * self._limits.waiting_served_ratio)

    def _chunking(self) -> bool:
        """Whether a running prompt is still being prefilled in chunks (no token yet)."""
        return any(e.generated == 0 and e.started_at is not None for e in self._running.values())

    def _admission_cap(self, running: int) -> int | None:
        cap = None if self._limits.max_batch_size is None else self._limits.max_batch_size - running
        if self._prefill_cap is not None:
            cap = self._prefill_cap if cap is None else min(cap, self._prefill_cap)
        return cap

    def _running_tokens(self) -> int:
        return sum(e.kv_tokens(self._limits.block_size) for e in self._running.values())

    # ---- shard calls -----------------------------------------------------------------

    async def _prefill(self, entries: list[Entry]) -> list[generate_pb2.CachedBatch]:
        """Prefill ``entries``; the cached batches to decode (none when every request ended or failed).

        A prefill the shards refuse because of one request's content (the same non-fatal error on
        every shard) fails that request only: the shard names it ("request N: ..."), or else the
        batch is split in halves and each half retried until the requests at fault are alone.
        """
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        now = time.monotonic()
        for entry in entries:
            if entry.started_at is None:
                entry.started_at = now
                self._metrics.request_queue_duration.observe(now - entry.queued_at)
            self._running[entry.id] = entry
        self._update_gauges()
        batch = generate_pb2.Batch(id=batch_id, requests=[e.to_pb() for e in entries])
        tokens = sum(e.request.input_length for e in entries)
        self._metrics.batch_inference_count.labels(method="prefill").inc()
        self._metrics.batch_inference_batch_size.labels(method="prefill").observe(len(entries))
        try:
            answer = await self._client.prefill(batch, self._limits.max_batch_prefill_tokens)
        except ShardError as err:
            self._metrics.batch_inference_failure.labels(method="prefill").inc()
            live = [e for e in entries if not e.done]
            if err.fatal or err.resource_exhausted:
                for entry in live:
                    self._running.pop(entry.id, None)
                    entry.started_at = None
                if err.fatal:
                    self._queue.push_front(live)
                    raise
                self._requeue_after_exhaustion(live, err)
                self._update_gauges()
                return []
            return await self._isolate(batch_id, live, err)
        elapsed = time.monotonic() - now
        self._metrics.batch_inference_success.labels(method="prefill").inc()
        self._metrics.batch_inference_duration.labels(method="prefill").observe(elapsed)
        self._metrics.input_tokens.inc(tokens)
        logger.debug(f"Prefill of batch {batch_id}: {len(entries)} request(s), {tokens} tokens, {elapsed:.3f} s")
        self._process(answer.generations)
        return [answer.batch] if answer.HasField("batch") else []

    async def _isolate(self, batch_id: int, live: list[Entry], err: ShardError) -> list[generate_pb2.CachedBatch]:
        """A prefill of ``live`` failed on every shard alike: fail the request(s) at fault, prefill the rest."""
        code = grpc.StatusCode.INVALID_ARGUMENT if err.code == grpc.StatusCode.INVALID_ARGUMENT else grpc.StatusCode.INTERNAL
        if len(live) <= 1:
            logger.error(f"Prefill of batch {batch_id} failed: {err}")
            for entry in live:
                self._fail(entry, code, f"generation failed: {err.details}")
            self._update_gauges()
            return []
        named = _REQUEST_AT_FAULT.match(err.details)
        culprit = next((e for e in live if named and e.id == int(named.group(1))), None)
        if culprit is not None:
            logger.warning(f"Prefill of batch {batch_id} failed because of request {culprit.id}; "
                           f"prefilling the other {len(live) - 1} without it ({err.details})")
            self._fail(culprit, code, f"generation failed: {err.details}")
            groups = [[e for e in live if e is not culprit]]
        else:
            logger.warning(f"Prefill of batch {batch_id} ({len(live)} requests) failed: {err}; "
                           f"retrying in halves to find the request(s) at fault")
            half = len(live) // 2
            groups = [live[:half], live[half:]]
        try:
            await self._client.clear_cache(batch_id)  # nothing should be left of it; make sure
        except ShardError as clear_err:
            if clear_err.fatal:
                raise
        cached: list[generate_pb2.CachedBatch] = []
        for group in groups:
            group = [e for e in group if not e.done]
            if group:
                cached += await self._prefill(group)
        return cached

    def _requeue_after_exhaustion(self, entries: list[Entry], err: ShardError) -> None:
        if not entries:
            return
        if self._running:
            self._prefill_blocked = True
            logger.warning(
                f"Shards out of KV cache for a prefill of {len(entries)} request(s); "
                f"requeued until a running request finishes ({err.details})"
            )
        elif len(entries) > 1:
            self._prefill_cap = max(1, len(entries) // 2)
            logger.warning(
                f"Shards out of KV cache for a prefill of {len(entries)} request(s) with nothing running; "
                f"retrying with at most {self._prefill_cap} ({err.details})"
            )
        else:
            entry = entries[0]
            self._fail(
                entry,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the shards cannot hold this request's {entry.request.input_length} input tokens in their "
                f"KV cache even with nothing else running ({err.details}); lower --max-total-tokens "
                f"or --max-batch-total-tokens, or give the shards more memory",
            )
            return
        self._queue.push_front(entries)

    async def _decode(self, batches: list[generate_pb2.CachedBatch]) -> generate_pb2.DecodeResponse | None:
        """One decode step of ``batches`` (after dropping what the router finished); the answer,
        or None when nothing was left to decode or the step failed (its requests failed)."""
        batches = await self._prune(batches)
        if not batches:
            return None
        size = sum(len(b.request_ids) for b in batches)
        self._metrics.batch_inference_count.labels(method="decode").inc()
        self._metrics.batch_inference_batch_size.labels(method="decode").observe(size)
        start = time.monotonic()
        try:
            answer = await self._client.decode(batches, self._limits.max_batch_prefill_tokens)
        except ShardError as err:
            self._metrics.batch_inference_failure.labels(method="decode").inc()
            if err.fatal:
                raise
            logger.error(f"Decode of {size} request(s) failed: {err}")
            await self._abandon(batches, err)
            return None
        self._metrics.batch_inference_success.labels(method="decode").inc()
        self._metrics.batch_inference_duration.labels(method="decode").observe(time.monotonic() - start)
        return answer

    async def _prune(self, batches: list[generate_pb2.CachedBatch]) -> list[generate_pb2.CachedBatch]:
        """Drop from the shards every request the router already finished (FilterBatch / ClearCache)."""
        kept: list[generate_pb2.CachedBatch] = []
        try:
            for batch in batches:
                keep = [rid for rid in batch.request_ids if rid in self._running]
                if len(keep) == len(batch.request_ids):
                    kept.append(batch)
                elif keep:
                    kept.append(await self._client.filter_batch(batch.id, keep))
                else:
                    await self._client.clear_cache(batch.id)
        except ShardError as err:
            if err.fatal:
                raise
            logger.error(f"Dropping finished requests from the shards failed: {err}")
            await self._abandon(batches, err)
            return []
        return kept

    async def _abandon(self, batches: list[generate_pb2.CachedBatch], err: ShardError) -> None:
        """A batch call failed: fail its requests and clear the shards' cache."""
        ids = {rid for batch in batches for rid in batch.request_ids}
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if err.resource_exhausted else grpc.StatusCode.INTERNAL
        for rid in ids:
            entry = self._running.get(rid)
            if entry is not None:
                self._fail(entry, code, f"generation failed: {err.details}")
        self._update_gauges()
        try:
            await self._client.clear_cache()
        except ShardError as clear_err:
            if clear_err.fatal:
                raise
            logger.error(f"Clearing the shards' cache after a failed batch also failed: {clear_err}")

    # ---- bookkeeping -----------------------------------------------------------------

    def _process(self, generations) -> None:
        now = time.monotonic()
        for generation in generations:
            entry = self._running.get(generation.request_id)
            if entry is None:
                continue  # finished by the router (cancel, shutdown) while the shard was busy
            if entry.generated == 0:
                if entry.request.response.input_tokens:
                    entry.on_input_tokens(list(generation.prefill_tokens))
                self._metrics.request_first_token_duration.observe(now - entry.queued_at)
                self._count_prefix_reuse(entry, generation.cached_tokens)
            elif entry.last_token_at is not None:
                self._metrics.request_inter_token_duration.observe(now - entry.last_token_at)
            entry.last_token_at = now
            step = entry.on_generation(generation, now)
            self._metrics.generated_tokens.inc()
            if step.finished:
                self._running.pop(entry.id, None)
                self._record_success(entry, now)
                self._request_finished()
        self._update_gauges()

    def _count_prefix_reuse(self, entry: Entry, cached_tokens: int) -> None:
        entry.cached_tokens = cached_tokens
        metrics = self._metrics
        metrics.prefix_cache_prompt_tokens.inc(entry.request.input_length)
        self._prompt_tokens += entry.request.input_length
        self._reused_tokens += cached_tokens
        metrics.prefix_cache_hit_ratio.set(self._reused_tokens / max(1, self._prompt_tokens))
        if cached_tokens:
            metrics.prefix_cache_hits.inc()
            metrics.prefix_cache_reused_tokens.inc(cached_tokens)
            entry.log.debug(f"{entry.label} reused {cached_tokens} of {entry.request.input_length} prompt tokens "
                            f"from the prefix cache")

    def _expire_waiting(self) -> None:
        expired = self._queue.take_expired(time.monotonic())
        for entry in expired:
            entry.finish(fmaas.TIME_LIMIT)
            self._record_success(entry, time.monotonic())
        if expired:
            self._update_gauges()

    def _record_success(self, entry: Entry, now: float) -> None:
        reason = fmaas.StopReason.Name(entry.stop_reason)
        metrics = self._metrics
        metrics.request_success.labels(stop_reason=reason, kind=entry.kind, api=entry.api).inc()
        metrics.request_generated_tokens.observe(entry.generated)
        metrics.request_total_tokens.observe(entry.request.input_length + entry.generated)
        metrics.request_duration.observe(now - entry.queued_at)
        if entry.started_at is not None:
            inference = now - entry.started_at
            metrics.request_inference_duration.observe(inference)
            if entry.generated:
                metrics.request_mean_time_per_token_duration.observe(inference / entry.generated)
        entry.log.info(
            f"{entry.label} finished: {reason} after {entry.generated} token(s) "
            f"({entry.request.input_length} input tokens, {now - entry.queued_at:.3f} s)"
        )

    def _fail(self, entry: Entry, code: grpc.StatusCode, message: str) -> None:
        entry.log.warning(f"{entry.label} failed after {entry.generated} token(s): {code.name}: {message}")
        self._running.pop(entry.id, None)
        entry.fail(code, message)
        self._metrics.request_failure.labels(err="generate", api=entry.api).inc()
        self._request_finished()

    def _request_finished(self) -> None:
        # KV memory was freed (or will be at the next step): refused prefills may now fit.
        self._prefill_blocked = False
        self._prefill_cap = None

    def _update_gauges(self) -> None:
        self._metrics.queue_size.set(len(self._queue))
        self._metrics.batch_current_size.set(len(self._running))
        self._metrics.batch_current_max_tokens.set(self._running_tokens())
        self._metrics.in_flight.set(self.in_flight)
        usage = self._client.kv_usage
        if usage is not None:
            self._metrics.kv_cache_blocks_used.set(usage.blocks_used)
            self._metrics.kv_cache_blocks_total.set(usage.blocks_total)
            self._metrics.kv_cache_blocks_cached.set(usage.blocks_cached)

    def fail_all(self, message: str) -> None:
        """The shards are gone: fail every request, stop the loop, and report it (idempotent)."""
        self._fatal(message)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def _fatal(self, message: str) -> None:
        if self.failed is not None:
            return
        self.failed = message
        logger.error(f"Shards failed; the router cannot serve any more: {message}")
        for entry in self._queue.drain() + list(self._running.values()):
            entry.fail(grpc.StatusCode.UNAVAILABLE, f"the model shards are unavailable: {message}")
        self._running.clear()
        self._update_gauges()
        self._on_fatal(message)
