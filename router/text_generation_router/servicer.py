"""fmaas.GenerationService: the public TGIS API.

Handlers validate, hand prompts to the scheduler and turn its Steps into
responses. Errors become gRPC statuses in one place (``_status_errors``):
ValidationError -> INVALID_ARGUMENT, too many requests -> RESOURCE_EXHAUSTED,
not ready / draining / shards gone -> UNAVAILABLE, anything unexpected ->
INTERNAL (logged with its traceback). A client that goes away
(stream closed, RPC cancelled, deadline) cancels its requests, whose KV is
freed at the next step. The single served model answers any model_id.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import grpc
from loguru import logger
from text_generation_server.pb.fmaas import generation_pb2 as fmaas
from text_generation_server.pb.fmaas import generation_pb2_grpc

from .entry import Entry
from .request import Failure, InputTokens
from .responses import stream_first, stream_step, token_info
from .serving import ApiError, ServingState
from .validation import ValidationError, refuse_adapter


def _status_errors(handler):
    """Map router exceptions to gRPC statuses (every handler returns or writes its messages)."""

    @functools.wraps(handler)
    async def wrapper(self: GenerationServicer, request, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except ApiError as err:
            await self._abort(context, err)
        except ValidationError as err:
            await self._abort(context, self._invalid(err, context))
        except Exception as err:
            await self._abort(context, self._internal(handler.__name__, err, context))

    return wrapper


CORRELATION_ID_HEADER = "x-correlation-id"
# The api label of this API's metrics.
API = "grpc"


def correlation_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-correlation-id metadata (TGIS logs it with the request), or ""."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == CORRELATION_ID_HEADER:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def _tokenize_response(encoding, *, keep_last: int) -> fmaas.TokenizeResponse:
    """One Tokenize answer (built on the tokenizer's thread: a long text has hundreds of thousands of tokens)."""
    encoding = encoding.keep_last(keep_last)
    return fmaas.TokenizeResponse(
        token_count=len(encoding.ids),
        tokens=encoding.tokens or [],
        offsets=[fmaas.TokenizeResponse.Offset(start=s, end=e) for s, e in encoding.offsets or []],
    )


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Implements Generate, GenerateStream, Tokenize and ModelInfo."""

    def __init__(self, state: ServingState) -> None:
        self._state = state

    # ---- helpers ---------------------------------------------------------------------

    @staticmethod
    def _who(context: grpc.aio.ServicerContext) -> str:
        cid = correlation_id(context)
        return f" (x-correlation-id {cid})" if cid else ""

    @staticmethod
    def _log(context: grpc.aio.ServicerContext):
        """loguru's logger with the call's ``correlation_id`` in the record's extra, as Entry.log binds it."""
        cid = correlation_id(context)
        return logger.bind(correlation_id=cid) if cid else logger

    def _invalid(self, err: ValidationError, context: grpc.aio.ServicerContext) -> ApiError:
        self._state.metrics.request_failure.labels(err="validation", api=API).inc()
        self._log(context).warning(f"Rejected request{self._who(context)}: {err}")
        return ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def _internal(self, method: str, err: Exception, context: grpc.aio.ServicerContext) -> ApiError:
        self._state.metrics.request_failure.labels(err="internal", api=API).inc()
        self._log(context).opt(exception=err).error(
            f"{method}{self._who(context)} failed unexpectedly: {type(err).__name__}: {err}"
        )
        return ApiError(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(err).__name__}: {err}")

    async def _abort(self, context: grpc.aio.ServicerContext, err: ApiError) -> None:
        if err.code == grpc.StatusCode.UNAVAILABLE:
            self._state.metrics.request_failure.labels(err="unavailable", api=API).inc()
        await context.abort(err.code, err.message)

    def _admit(self, prompts: int, context: grpc.aio.ServicerContext):
        """Count prompts against --max-concurrent-requests for the life of the RPC."""
        return self._state.admit(prompts, api=API, who=self._who(context), log=self._log(context))

    # ---- RPCs ------------------------------------------------------------------------

    @_status_errors
    async def Generate(self, request: fmaas.BatchedGenerationRequest, context) -> fmaas.BatchedGenerationResponse:
        state = self._state
        state.metrics.request_count.labels(kind="single" if len(request.requests) == 1 else "batch", api=API).inc()
        state.check_available()
        if not request.requests:
            return fmaas.BatchedGenerationResponse()
        kind = "single" if len(request.requests) == 1 else "batch"
        self._state.check_payload([r.text for r in request.requests])
        with self._admit(len(request.requests), context):
            validated = await self._validate(
                [r.text for r in request.requests], request.params, request.adapter_id or request.prefix_id
            )
            entries = state.scheduler.submit(validated, kind=kind, api=API, correlation_id=correlation_id(context))
            try:
                responses = await asyncio.gather(*(self._collect(e) for e in entries))
            finally:
                for entry in entries:
                    state.scheduler.cancel(entry)
        return fmaas.BatchedGenerationResponse(responses=responses)

    async def _validate(self, texts: list[str], params: fmaas.Parameters, adapter_id: str) -> list:
        return await self._state.validate(texts, params, adapter_id=adapter_id)

    async def _collect(self, entry: Entry) -> fmaas.GenerationResponse:
        """Wait for one prompt to finish and build its unary response."""
        request = entry.request
        options = request.response
        tokenizer = self._state.tokenizer
        response = fmaas.GenerationResponse(input_token_count=request.input_length, seed=request.seed_reported)
        parts = [request.text] if options.input_text else []
        while True:
            event = await entry.events.get()
            if isinstance(event, Failure):
                raise ApiError(event.code, event.message)
            if isinstance(event, InputTokens):
                response.input_tokens.extend(token_info(t, options, tokenizer) for t in event.tokens)
                continue
            parts.append(event.text)
            if event.token is not None and options.generated_tokens:
                response.tokens.append(token_info(event.token, options, tokenizer))
            if event.finished:
                response.generated_token_count = event.generated_tokens
                response.stop_reason = event.stop_reason
                response.stop_sequence = event.stop_sequence
                response.text = "".join(parts)
                return response

    @_status_errors
    async def GenerateStream(self, request: fmaas.SingleGenerationRequest, context) -> None:
        # Written with context.write rather than yielded, so that each message's wait for the
        # client (HTTP/2 flow control) is bounded by --stream-write-timeout.
        state = self._state
        state.metrics.request_count.labels(kind="stream", api=API).inc()
        state.check_available()
        if not request.HasField("request"):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "request is missing: set request.text")
        self._state.check_payload([request.request.text])
        with self._admit(1, context):
            [validated] = await self._validate(
                [request.request.text], request.params, request.adapter_id or request.prefix_id
            )
            [entry] = state.scheduler.submit([validated], kind="stream", api=API, correlation_id=correlation_id(context))
            try:
                async for message in self._stream(entry):
                    if not await self._write(context, message, entry):
                        return
            finally:
                state.scheduler.cancel(entry)

    async def _write(self, context: grpc.aio.ServicerContext, message, entry: Entry) -> bool:
        """Send one stream message; False when the client did not take it within --stream-write-timeout.

        A client that stops reading fills its flow-control window and every later write waits. Such a
        stream is cancelled (its KV freed at the next step) and its RPC ended with CANCELLED, so that
        its admission slot returns instead of being held for as long as the client stays connected.
        """
        timeout = self._state.limits.stream_write_timeout
        try:
            async with asyncio.timeout(timeout):
                await context.write(message)
            return True
        except TimeoutError:
            pass
        why = f"because the client took no stream message for {timeout:g} s (--stream-write-timeout)"
        self._state.scheduler.cancel(entry, cause="stalled", why=why)
        # The status waits behind the unread messages; setting it (rather than awaiting abort)
        # lets this handler, and the admission it holds, end now.
        context.set_code(grpc.StatusCode.CANCELLED)
        context.set_details(f"stream cancelled by the server {why}")
        return False

    async def _stream(self, entry: Entry) -> AsyncIterator[fmaas.GenerationResponse]:
        request = entry.request
        tokenizer = self._state.tokenizer
        first_sent = False
        if not request.response.input_tokens:
            # Without input token details the first message needs nothing from the shards.
            yield stream_first(request, [])
            first_sent = True
        while True:
            event = await entry.events.get()
            if isinstance(event, Failure):
                raise ApiError(event.code, event.message)
            if isinstance(event, InputTokens):
                if not first_sent:
                    infos = [token_info(t, request.response, tokenizer) for t in event.tokens]
                    yield stream_first(request, infos)
                    first_sent = True
                continue
            if not first_sent:
                yield stream_first(request, [])
                first_sent = True
            yield stream_step(request, event, tokenizer)
            if event.finished:
                return

    @_status_errors
    async def Tokenize(self, request: fmaas.BatchedTokenizeRequest, context) -> fmaas.BatchedTokenizeResponse:
        state = self._state
        state.check_available()
        refuse_adapter(request.adapter_id or request.prefix_id)
        state.metrics.tokenize_request_count.inc()
        responses = []
        total = 0
        if not request.requests:
            return fmaas.BatchedTokenizeResponse()
        # Bounded and admitted like generation: its texts count against --payload-limit and its
        # items against --max-concurrent-requests while they are tokenized.
        self._state.check_payload([item.text for item in request.requests])
        with self._admit(len(request.requests), context):
            for item in request.requests:
                response = await state.tokenizer.encode_async(
                    item.text, with_tokens=request.return_tokens, with_offsets=request.return_offsets,
                    then=functools.partial(_tokenize_response, keep_last=request.truncate_input_tokens),
                )
                total += response.token_count
                responses.append(response)
        state.metrics.tokenize_request_tokens.observe(total)
        return fmaas.BatchedTokenizeResponse(responses=responses)

    @_status_errors
    async def ModelInfo(self, request: fmaas.ModelInfoRequest, context) -> fmaas.ModelInfoResponse:
        state = self._state
        state.check_available()
        return fmaas.ModelInfoResponse(
            model_kind=fmaas.ModelInfoResponse.DECODER_ONLY,
            max_sequence_length=state.limits.max_total_tokens,
            max_new_tokens=state.limits.max_new_tokens,
        )
