"""One request's life inside the router: queued, running, finished.

The Entry turns the shard's per-token Generations into client-facing Steps:
it detokenizes incrementally, applies the stopping rules only the router can
see (stop sequences on text, time limits), maps the shard's finish reasons to
TGIS stop reasons, and hands each Step to the waiting RPC through a queue.
"""

from __future__ import annotations

import asyncio
import math

import grpc
from loguru import logger
from text_generation_server.pb.fmaas import generation_pb2 as fmaas
from text_generation_server.pb.generate.v1 import generate_pb2

from .detokenize import IncrementalDetokenizer
from .request import Event, Failure, InputTokens, Step, TokenOut, ValidatedRequest
from .stop_sequences import StopMatch, find_stop_sequence, holdback
from .tokenization import Tokenizer


def _token_out(token: generate_pb2.Token) -> TokenOut:
    return TokenOut(
        token_id=token.id,
        logprob=token.logprob,
        rank=token.rank,
        top_tokens=tuple((t.id, t.logprob) for t in token.top_tokens),
    )


class Entry:
    """A validated request and everything the router tracks about it while it runs."""

    def __init__(
        self,
        request_id: int,
        request: ValidatedRequest,
        tokenizer: Tokenizer,
        now: float,
        *,
        kind: str = "single",
        api: str = "grpc",
        correlation_id: str = "",
    ) -> None:
        self.id = request_id
        self.request = request
        self.kind = kind
        self.api = api
        self.correlation_id = correlation_id
        self.queued_at = now
        self.started_at: float | None = None
        self.last_token_at: float | None = None
        self.deadline = now + request.time_limit_ms / 1000.0 if request.time_limit_ms > 0 else None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.generated = 0
        self.cached_tokens = 0  # prompt tokens whose KV the prefix cache held
        self.cancelled = False
        self.done = False
        self.stop_reason: int = fmaas.NOT_FINISHED
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer.decode, request.input_ids)
        self._text = ""
        self._emitted = 0
        self._holdback = holdback(request.stop_sequences) if request.stop_sequences else 0

    @property
    def label(self) -> str:
        """How logs name this request: its id, and the client's x-correlation-id when it sent one."""
        if self.correlation_id:
            return f"Request {self.id} (x-correlation-id {self.correlation_id})"
        return f"Request {self.id}"

    @property
    def log(self):
        """loguru's logger with ``correlation_id`` in the record's extra (a field of its own in JSON logs)."""
        return logger.bind(correlation_id=self.correlation_id) if self.correlation_id else logger

    @property
    def output_text(self) -> str:
        """Generated text so far (after a stop sequence: cut where it says)."""
        return self._text

    def kv_tokens(self, block_size: int) -> int:
        """KV cache tokens this request may hold at its limit, in whole blocks."""
        tokens = self.request.input_length + self.request.max_new_tokens
        return -(-tokens // block_size) * block_size

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def to_pb(self) -> generate_pb2.Request:
        """The internal request sent in a Prefill."""
        req, sampling = self.request, self.request.sampling
        return generate_pb2.Request(
            id=self.id,
            input_ids=req.input_ids,
            sampling=generate_pb2.SamplingParameters(
                do_sample=sampling.do_sample,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                typical_p=sampling.typical_p,
                seed=sampling.seed,
                repetition_penalty=sampling.repetition_penalty,
            ),
            stopping=generate_pb2.StoppingParameters(
                max_new_tokens=req.max_new_tokens,
                min_new_tokens=req.min_new_tokens,
            ),
            top_n_tokens=req.response.top_n_tokens,
            prefill_logprobs=req.response.input_tokens,
        )

    def on_input_tokens(self, tokens: list[generate_pb2.Token]) -> None:
        """Pass the prompt's token logprobs on (the first prompt token has none: NaN, rank 0)."""
        infos = [_token_out(t) for t in tokens]
        if infos:
            infos[0] = TokenOut(token_id=infos[0].token_id, logprob=math.nan, rank=0, top_tokens=())
        self.events.put_nowait(InputTokens(tuple(infos)))

    def on_generation(self, generation: generate_pb2.Generation, now: float) -> Step:
        """Take the shard's next token for this request; the Step says whether it finished."""
        token = _token_out(generation.token)
        self.generated = max(self.generated + 1, generation.generated_tokens)
        req = self.request
        before = len(self._text)
        self._text += self._detok.step(token.token_id)
        match: StopMatch | None = None
        if req.stop_sequences and len(self._text) > before and self.generated >= req.min_new_tokens:
            match = find_stop_sequence(self._text, before, req.stop_sequences, req.include_stop_sequence)
        reason, stop_sequence = fmaas.NOT_FINISHED, ""
        if match is not None:
            reason, stop_sequence = fmaas.STOP_SEQUENCE, match.sequence
            self._text = self._text[: match.keep]
        elif generation.finish_reason == generate_pb2.FINISH_REASON_EOS_TOKEN:
            reason = fmaas.EOS_TOKEN
        elif generation.finish_reason == generate_pb2.FINISH_REASON_STOP_TOKEN:
            reason, stop_sequence = fmaas.STOP_SEQUENCE, self._tokenizer.id_to_token(token.token_id)
        elif generation.finish_reason == generate_pb2.FINISH_REASON_LENGTH or self.generated >= req.max_new_tokens:
            reason = fmaas.TOKEN_LIMIT if req.max_is_token_limit else fmaas.MAX_TOKENS
        elif self.expired(now):
            reason = fmaas.TIME_LIMIT
        if reason != fmaas.NOT_FINISHED and match is None:
            self._text += self._detok.flush()
        return self._emit(token, reason, stop_sequence)

    def finish(self, reason: int) -> Step:
        """End the request without a new token (cancelled, timed out, shutting down)."""
        if self.generated:
            self._text += self._detok.flush()
        return self._emit(None, reason, "")

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """End the request with an error status."""
        self.done = True
        self.stop_reason = fmaas.ERROR
        self.events.put_nowait(Failure(code, message))

    def _emit(self, token: TokenOut | None, reason: int, stop_sequence: str) -> Step:
        if reason != fmaas.NOT_FINISHED:
            end = len(self._text)
            self.done = True
            self.stop_reason = reason
        else:
            end = max(self._emitted, len(self._text) - self._holdback)
        step = Step(
            token=token,
            text=self._text[self._emitted : end],
            generated_tokens=self.generated,
            stop_reason=reason,
            stop_sequence=stop_sequence,
        )
        self._emitted = end
        self.events.put_nowait(step)
        return step
