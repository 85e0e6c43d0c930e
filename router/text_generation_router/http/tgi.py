"""TGI's generation routes: POST /generate, /generate_stream and / (either, by ``stream``).

Parameters are checked with TGI's rules and messages, then mapped onto the
router's own request (``fmaas.Parameters``) and run on the shared path:
sampling is on when ``do_sample`` or any sampling parameter is set (as TGI's
shards decide), ``details`` and ``decoder_input_details`` ask for the
generated and prompt tokens with their log probabilities, ``best_of`` runs
that many sampled sequences and returns the most likely one with the others
in ``best_of_sequences``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator

from fastapi import Request
from text_generation_server.pb.fmaas import generation_pb2 as fmaas

from ..request import InputTokens, TokenOut
from ..serving import ServingState
from ..validation import ValidationError
from .calls import Call, EventSource, Outcome, cancelled_error, collect, events, finish_reason
from .schemas import GenerateParameters

API = "http"


def _sampling_requested(p: GenerateParameters) -> bool:
    return p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))


def check_parameters(p: GenerateParameters, max_best_of: int) -> None:
    """TGI's checks of its own parameters (the shared validator checks limits afterwards)."""
    if p.temperature is not None and not p.temperature > 0:
        raise ValidationError(f"`temperature` must be strictly positive (got {p.temperature})")
    if p.repetition_penalty is not None and not p.repetition_penalty > 0:
        raise ValidationError(f"`repetition_penalty` must be strictly positive (got {p.repetition_penalty})")
    if p.frequency_penalty:
        raise ValidationError("`frequency_penalty` is not supported by this server; leave it unset or 0")
    if p.top_p is not None and not 0 < p.top_p <= 1:
        raise ValidationError(f"`top_p` must be > 0.0 and <= 1.0 (got {p.top_p})")
    if p.typical_p is not None and not 0 < p.typical_p <= 1:
        raise ValidationError(f"`typical_p` must be > 0.0 and <= 1.0 (got {p.typical_p})")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError(f"`top_k` must be strictly positive (got {p.top_k})")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise ValidationError(f"`max_new_tokens` must be strictly positive (got {p.max_new_tokens})")
    if p.truncate is not None and p.truncate <= 0:
        raise ValidationError(f"`truncate` must be strictly positive (got {p.truncate})")
    if p.top_n_tokens is not None and p.top_n_tokens < 0:
        raise ValidationError(f"`top_n_tokens` must be >= 0 (got {p.top_n_tokens})")
    if p.seed is not None and not 0 <= p.seed < 2**64:
        raise ValidationError(f"`seed` must be between 0 and 2^64 - 1 (got {p.seed})")
    if p.watermark:
        raise ValidationError("`watermark` is not supported by this server; leave it false")
    if p.grammar is not None:
        raise ValidationError("`grammar` (guided generation) is not supported by this server; leave it unset")
    if p.best_of is not None:
        if p.best_of <= 0:
            raise ValidationError(f"`best_of` must be strictly positive (got {p.best_of})")
        if p.best_of > max_best_of:
            raise ValidationError(f"`best_of` must be <= {max_best_of} (--max-best-of; got {p.best_of})")
        if p.best_of > 1 and p.seed is not None:
            raise ValidationError("`seed` must not be set when `best_of` is > 1")
        if p.best_of > 1 and not _sampling_requested(p):
            raise ValidationError("you must use sampling when `best_of` is > 1 (set do_sample or a sampling parameter)")


def to_fmaas(p: GenerateParameters, *, logprobs: bool = False) -> fmaas.Parameters:
    """The router's request parameters for TGI's (already checked by :func:`check_parameters`)."""
    params = fmaas.Parameters()
    if _sampling_requested(p):
        params.method = fmaas.SAMPLE
        params.sampling.temperature = p.temperature if p.temperature is not None else 1.0
        params.sampling.top_k = p.top_k or 0
        params.sampling.top_p = p.top_p if p.top_p is not None and p.top_p < 1 else 0.0
        params.sampling.typical_p = p.typical_p if p.typical_p is not None and p.typical_p < 1 else 0.0
        if p.seed is not None:
            # The shards take a 64-bit seed; fmaas carries it as uint64.
            params.sampling.seed = p.seed
    if p.repetition_penalty is not None:
        params.decoding.repetition_penalty = p.repetition_penalty
    if p.max_new_tokens is not None:
        params.stopping.max_new_tokens = p.max_new_tokens
    params.stopping.stop_sequences.extend(p.stop)
    if p.truncate is not None:
        params.truncate_input_tokens = p.truncate
    response = params.response
    top_n = p.top_n_tokens or 0
    response.generated_tokens = p.details or top_n > 0 or logprobs
    response.input_tokens = p.decoder_input_details
    response.token_logprobs = response.generated_tokens or response.input_tokens
    response.top_n_tokens = top_n
    return params


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def token_json(state: ServingState, token: TokenOut, text: str | None = None) -> dict:
    tok = state.tokenizer
    return {
        "id": token.token_id,
        "text": tok.token_text(token.token_id) if text is None else text,
        "logprob": _logprob(token.logprob),
        "special": tok.is_special(token.token_id),
    }


def top_tokens_json(state: ServingState, token: TokenOut, n: int) -> list[dict]:
    tok = state.tokenizer
    return [
        {"id": tid, "text": tok.token_text(tid), "logprob": _logprob(lp), "special": tok.is_special(tid)}
        for tid, lp in token.top_tokens[:n]
    ]


def _sequence_json(state: ServingState, outcome: Outcome, p: GenerateParameters) -> dict:
    request = outcome.request
    top_n = request.response.top_n_tokens
    tok = state.tokenizer
    return {
        "generated_text": outcome.text,
        "finish_reason": finish_reason(outcome.last),
        "generated_tokens": outcome.last.generated_tokens,
        "seed": request.sampling.seed if request.sampling.do_sample else None,
        "prefill": [
            {"id": t.token_id, "text": tok.token_text(t.token_id), "logprob": _logprob(t.logprob)}
            for t in outcome.input_tokens
        ],
        "tokens": [token_json(state, t) for t in outcome.tokens],
        "top_tokens": [top_tokens_json(state, t, top_n) for t in outcome.tokens] if top_n else [],
    }


async def generate(state: ServingState, request: Request, body, max_best_of: int) -> dict:
    """POST /generate: the finished text, with details when asked."""
    p = body.parameters
    check_parameters(p, max_best_of)
    best_of = p.best_of or 1
    call = Call(state, API, "single" if best_of == 1 else "batch")
    try:
        entries = await call.start(request, [body.inputs] * best_of, to_fmaas(p, logprobs=best_of > 1),
                                   adapter_id=p.adapter_id or "")
        outcomes = await asyncio.gather(*(collect(e) for e in entries))
    finally:
        call.close()
    best = max(outcomes, key=lambda o: o.logprob_sum) if best_of > 1 else outcomes[0]
    text = (body.inputs if p.return_full_text else "") + best.text
    answer: dict = {"generated_text": text}
    if p.details:
        details = _sequence_json(state, best, p)
        del details["generated_text"]
        if best_of > 1:
            details["best_of_sequences"] = [
                _sequence_json(state, o, p) for o in outcomes if o is not best
            ]
        answer["details"] = details
    return answer


async def generate_stream(state: ServingState, request: Request, body) -> AsyncIterator[bytes]:
    """POST /generate_stream: prepare the call (errors raise before any event), then its events."""
    p = body.parameters
    check_parameters(p, 1)
    if (p.best_of or 1) > 1:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    call = Call(state, API, "stream")
    try:
        [entry] = await call.start(request, [body.inputs], to_fmaas(p, logprobs=True), adapter_id=p.adapter_id or "")
    except BaseException:
        call.close()
        raise
    return EventSource(_stream_events(state, call, entry, body), call)


async def _stream_events(state: ServingState, call: Call, entry, body) -> AsyncIterator[bytes]:
    p = body.parameters
    request = entry.request
    top_n = request.response.top_n_tokens
    parts = [body.inputs] if p.return_full_text else []
    index = 0
    try:
        async for event in events(entry):
            if isinstance(event, InputTokens):
                continue
            parts.append(event.text)
            if event.token is None:
                if event.finished:  # cancelled by the server (the client's own cancel ends the stream)
                    yield sse(error_json(cancelled_error()))
                    return
                continue
            index += 1
            special = state.tokenizer.is_special(event.token.token_id)
            message = {
                "index": index,
                "token": token_json(state, event.token, None if special else event.text),
                "top_tokens": top_tokens_json(state, event.token, top_n) if top_n else [],
                "generated_text": None,
                "details": None,
            }
            if event.finished:
                message["generated_text"] = "".join(parts)
            if event.finished and p.details:  # as TGI's: the finish reason and seed when asked
                message["details"] = {
                    "finish_reason": finish_reason(event),
                    "generated_tokens": event.generated_tokens,
                    "seed": request.sampling.seed if request.sampling.do_sample else None,
                    "input_length": request.input_length,
                }
            yield sse(message)
    except Exception as err:  # the call already streams: the error is its last event
        yield sse(error_json(err))
    finally:
        call.close()


def sse(payload: dict | str) -> bytes:
    """One server-sent event, as TGI writes them (``data: [DONE]`` ends the OpenAI streams)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def error_json(err: Exception) -> dict:
    from .errors import error_body

    return error_body(err)[1]
