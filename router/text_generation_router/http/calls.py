"""One HTTP generation call on the shared request path, and the client's connection watched meanwhile.

A call goes through :class:`ServingState` exactly as a gRPC call does (payload
limit, admission, validation, the scheduler). While it runs, the client's
connection is watched: when it closes, every prompt of the call is cancelled
and its KV freed at the next step, as for a cancelled gRPC stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from fastapi import Request
from text_generation_server.pb.fmaas import generation_pb2 as fmaas

from ..entry import Entry
from ..request import Failure, InputTokens, Step, TokenOut, ValidatedRequest
from ..serving import ApiError, ServingState

FINISH_REASONS = {
    fmaas.MAX_TOKENS: "length",
    fmaas.TOKEN_LIMIT: "length",
    fmaas.TIME_LIMIT: "length",
    fmaas.EOS_TOKEN: "eos_token",
    fmaas.STOP_SEQUENCE: "stop_sequence",
    fmaas.CANCELLED: "length",
}


def finish_reason(step: Step) -> str:
    """TGI's finish reason of a finished Step (length, eos_token, stop_sequence)."""
    return FINISH_REASONS.get(step.stop_reason, "length")


@dataclass
class Outcome:
    """One prompt's finished generation."""

    request: ValidatedRequest
    text: str = ""
    steps: list[Step] = field(default_factory=list)
    input_tokens: tuple[TokenOut, ...] = ()
    last: Step | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache held

    @property
    def tokens(self) -> list[TokenOut]:
        return [s.token for s in self.steps if s.token is not None]

    @property
    def logprob_sum(self) -> float:
        return sum(t.logprob for t in self.tokens)


async def events(entry: Entry) -> AsyncIterator[InputTokens | Step]:
    """The entry's events until its last Step; a Failure is raised as ApiError."""
    while True:
        event = await entry.events.get()
        if isinstance(event, Failure):
            raise ApiError(event.code, event.message)
        yield event
        if isinstance(event, Step) and event.finished:
            return


def cancelled_error() -> ApiError:
    """What a request cancelled by the server (a drain running out of time) answers."""
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        "the request was cancelled before it finished: the server is shutting down; retry on another replica",
    )


async def collect(entry: Entry) -> Outcome:
    """Wait for one prompt to finish; ApiError when it failed or was cancelled."""
    outcome = Outcome(entry.request)
    parts = []
    async for event in events(entry):
        if isinstance(event, InputTokens):
            outcome.input_tokens = event.tokens
            continue
        parts.append(event.text)
        if event.token is not None:
            outcome.steps.append(event)
        outcome.last = event
    if outcome.last.stop_reason == fmaas.CANCELLED:
        raise cancelled_error()
    outcome.text = "".join(parts)
    outcome.cached_tokens = entry.cached_tokens
    return outcome


class Call:
    """The prompts of one HTTP call: admitted, validated, queued; released by :meth:`close`."""

    def __init__(self, state: ServingState, api: str, kind: str) -> None:
        self.state = state
        self.api = api
        self.kind = kind
        self.entries: list[Entry] = []
        self._stack = contextlib.ExitStack()
        self._watcher: asyncio.Task | None = None

    async def start(
        self,
        request: Request,
        texts: list[str],
        params: fmaas.Parameters,
        *,
        adapter_id: str = "",
        add_special_tokens: bool = True,
    ) -> list[Entry]:
        """Admit and queue the prompts (raises ApiError / ValidationError before anything is queued)."""
        state = self.state
        state.metrics.request_count.labels(kind=self.kind, api=self.api).inc()
        state.check_available()
        try:
            state.check_payload(texts)
            self._stack.enter_context(state.admit(len(texts), api=self.api))
            validated = await state.validate(
                texts, params, adapter_id=adapter_id, add_special_tokens=add_special_tokens
            )
        except BaseException:
            self._stack.close()
            raise
        # TGIS's x-correlation-id, taken from an HTTP header as from gRPC metadata: it names the
        # requests in every log line about them.
        correlation_id = request.headers.get("x-correlation-id", "")
        self.entries = state.scheduler.submit(validated, kind=self.kind, api=self.api, correlation_id=correlation_id)
        self._watcher = asyncio.ensure_future(_cancel_on_disconnect(request, self.cancel_all))
        return self.entries

    def cancel_all(self) -> None:
        for entry in self.entries:
            self.state.scheduler.cancel(entry, why="by the client (HTTP connection closed)")

    def stall(self, timeout: float) -> None:
        """The client stopped reading its event stream: cancel, counted as stalled."""
        for entry in self.entries:
            self.state.scheduler.cancel(
                entry, cause="stalled",
                why=f"because the client took no event for {timeout:g} s (--stream-write-timeout)",
            )

    def close(self) -> None:
        """Stop watching, cancel what did not finish, return the admission slots (idempotent)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.state.scheduler is not None:
            for entry in self.entries:
                self.state.scheduler.cancel(entry)
        self._stack.close()


@dataclass
class EventSource:
    """A started streaming call: its server-sent events and the call they belong to."""

    events: AsyncIterator[bytes]
    call: Call


async def _cancel_on_disconnect(request: Request, cancel: Callable[[], None]) -> None:
    """Wait for the client's connection to close (the body is already read), then cancel."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel()
            return
