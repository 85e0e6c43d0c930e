"""The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Chat messages are rendered with the model's own chat template (from its
tokenizer files) and the prompt tokenized without adding special tokens a
second time. ``temperature`` 0 means greedy decoding; unset, it samples at
1.0 as OpenAI's API does. ``max_tokens`` unset is the room left up to
--max-new-tokens for chat and 16 for completions (OpenAI's defaults).
Everything else runs on the shared request path, with the ``openai`` label
on the metrics. Parameters this server cannot honour (n > 1, tools, penalties
other than repetition, logit bias, JSON modes) are refused with a 422 naming
them, never ignored.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from text_generation_server.pb.fmaas import generation_pb2 as fmaas

from ..request import Step, TokenOut
from ..serving import ServingState
from ..validation import ValidationError
from .calls import Call, EventSource, Outcome, cancelled_error, collect, events, finish_reason
from .schemas import ChatRequest, CompletionRequest
from .tgi import error_json, sse

API = "openai"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _lp(value: float) -> float:
    """A logprob JSON can carry: OpenAI's -9999.0 for one that is not finite (a token masked out)."""
    return value if math.isfinite(value) else -9999.0


def _openai_finish(step: Step) -> str:
    return "length" if finish_reason(step) == "length" else "stop"


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _common_checks(body, *, top_n: int) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise ValidationError(f"`{name}` is not supported by this server; leave it unset or 0 "
                                  "(`repetition_penalty` is)")
    if body.logit_bias:
        raise ValidationError("`logit_bias` is not supported by this server; leave it unset")
    if body.n is not None and body.n != 1:
        raise ValidationError(f"`n` must be 1 (got {body.n}): this server returns one choice per prompt")
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise ValidationError(f"`temperature` must be between 0 and 2 (got {body.temperature})")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise ValidationError(f"`top_p` must be > 0 and <= 1 (got {body.top_p})")
    if body.repetition_penalty is not None and not body.repetition_penalty > 0:
        raise ValidationError(f"`repetition_penalty` must be strictly positive (got {body.repetition_penalty})")
    if body.seed is not None and not 0 <= body.seed < 2**64:
        raise ValidationError(f"`seed` must be between 0 and 2^64 - 1 (got {body.seed})")
    if top_n < 0:
        raise ValidationError(f"the number of top log probabilities must be >= 0 (got {top_n})")


def _params(body, *, max_tokens: int | None, logprobs: bool, top_n: int) -> fmaas.Parameters:
    params = fmaas.Parameters()
    if body.temperature is None or body.temperature > 0:
        params.method = fmaas.SAMPLE
        params.sampling.temperature = 1.0 if body.temperature is None else body.temperature
        params.sampling.top_p = body.top_p if body.top_p is not None and body.top_p < 1 else 0.0
        if body.seed is not None:
            params.sampling.seed = body.seed
    if body.repetition_penalty is not None:
        params.decoding.repetition_penalty = body.repetition_penalty
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValidationError(f"`max_tokens` must be strictly positive (got {max_tokens})")
        params.stopping.max_new_tokens = max_tokens
    params.stopping.stop_sequences.extend(_stops(body.stop))
    params.response.generated_tokens = logprobs
    params.response.token_logprobs = logprobs
    params.response.top_n_tokens = top_n
    return params


def _envelope(state: ServingState, prefix: str) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": state.model_id,
        "system_fingerprint": state.system_fingerprint,
    }


def _usage(outcomes: list[Outcome]) -> dict:
    prompt = sum(o.request.input_length for o in outcomes)
    completion = sum(o.last.generated_tokens for o in outcomes)
    return _usage_of(prompt, completion, sum(o.cached_tokens for o in outcomes))


def _usage_of(prompt: int, completion: int, cached: int) -> dict:
    """OpenAI's usage object; ``cached`` prompt tokens came from the prefix cache."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---- chat -----------------------------------------------------------------------------------


def _messages(body: ChatRequest) -> list[dict]:
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ValidationError(
                        f"messages[{i}].content: parts of type {part.type!r} are not supported; this model reads text"
                    )
                texts.append(part.text)
            content = "".join(texts)
        message = {"role": m.role, "content": content or ""}
        if m.name:
            message["name"] = m.name
        messages.append(message)
    return messages


def _chat_checks(state: ServingState, body: ChatRequest) -> tuple[str, int]:
    """(prompt text, top_logprobs) of a chat request; ValidationError for what cannot be served."""
    top_n = body.top_logprobs or 0
    _common_checks(body, top_n=top_n)
    if top_n and not body.logprobs:
        raise ValidationError("`top_logprobs` needs `logprobs` set to true")
    if body.tools or (body.tool_choice not in (None, "none", "auto")):
        raise ValidationError("`tools` and `tool_choice` (function calling) are not supported by this server")
    if body.response_format is not None:
        kind = body.response_format.get("type") if isinstance(body.response_format, dict) else None
        if kind != "text":
            raise ValidationError("`response_format` other than {\"type\": \"text\"} (JSON modes) is not supported")
    tokenizer = state.tokenizer
    if tokenizer.chat_template is None:
        raise ValidationError(
            "the model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja): "
            "send the prompt text to /v1/completions or /generate instead"
        )
    try:
        prompt = tokenizer.apply_chat_template(_messages(body))
    except ValueError as err:
        raise ValidationError(str(err)) from None
    return prompt, top_n


def _chat_logprob(state: ServingState, token: TokenOut, top_n: int) -> dict:
    tok = state.tokenizer
    text = tok.token_text(token.token_id)
    return {
        "token": text,
        "logprob": _lp(token.logprob),
        "bytes": list(text.encode("utf-8")),
        "top_logprobs": [
            {"token": (t := tok.token_text(tid)), "logprob": _lp(lp), "bytes": list(t.encode("utf-8"))}
            for tid, lp in token.top_tokens[:top_n]
        ],
    }


async def chat_completions(state: ServingState, request: Request, body: ChatRequest):
    """The completion as one JSON object, or (stream) an async iterator of server-sent events."""
    prompt, top_n = _chat_checks(state, body)
    logprobs = bool(body.logprobs)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _params(body, max_tokens=max_tokens if max_tokens is not None else state.limits.max_new_tokens,
                     logprobs=logprobs, top_n=top_n)
    call = Call(state, API, "stream" if body.stream else "single")
    try:
        [entry] = await call.start(request, [prompt], params, add_special_tokens=False)
    except BaseException:
        call.close()
        raise
    if body.stream:
        return EventSource(_chat_stream(state, call, entry, body, top_n), call)
    try:
        outcome = await collect(entry)
    finally:
        call.close()
    return {
        **_envelope(state, "chatcmpl"),
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": outcome.text},
            "logprobs": {"content": [_chat_logprob(state, t, top_n) for t in outcome.tokens]} if logprobs else None,
            "finish_reason": _openai_finish(outcome.last),
        }],
        "usage": _usage([outcome]),
    }


async def _chat_stream(state: ServingState, call: Call, entry, body: ChatRequest, top_n: int) -> AsyncIterator[bytes]:
    envelope = {**_envelope(state, "chatcmpl"), "object": "chat.completion.chunk"}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    try:
        async for event in events(entry):
            if not isinstance(event, Step) or (event.token is None and not event.finished):
                continue
            if event.token is None and event.stop_reason == fmaas.CANCELLED:
                yield sse(error_json(cancelled_error()))
                return
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": event.text, "tool_calls": None},
                "logprobs": None,
                "finish_reason": _openai_finish(event) if event.finished else None,
            }
            if body.logprobs and event.token is not None:
                choice["logprobs"] = {"content": [_chat_logprob(state, event.token, top_n)]}
            yield sse({**envelope, "choices": [choice], "usage": None})
            if event.finished and include_usage:
                usage = _usage_of(entry.request.input_length, event.generated_tokens, entry.cached_tokens)
                yield sse({**envelope, "choices": [], "usage": usage})
        yield sse("[DONE]")
    except Exception as err:
        yield sse(error_json(err))
    finally:
        call.close()


# ---- completions ----------------------------------------------------------------------------


def _completion_logprobs(state: ServingState, outcome: Outcome, top_n: int, offset: int) -> dict:
    tok = state.tokenizer
    tokens, logprobs, tops, offsets = [], [], [], []
    for token in outcome.tokens:
        text = tok.token_text(token.token_id)
        tokens.append(text)
        logprobs.append(_lp(token.logprob))
        tops.append({tok.token_text(tid): _lp(lp) for tid, lp in token.top_tokens[:top_n]} if top_n else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


async def completions(state: ServingState, request: Request, body: CompletionRequest):
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    top_n = body.logprobs or 0
    _common_checks(body, top_n=top_n)
    if not prompts:
        raise ValidationError("`prompt` must hold at least one text")
    if len(prompts) > state.max_client_batch_size:
        raise ValidationError(
            f"`prompt` holds {len(prompts)} texts; at most {state.max_client_batch_size} per request "
            "(--max-client-batch-size)"
        )
    if body.suffix:
        raise ValidationError("`suffix` (insertion) is not supported by this server; leave it unset")
    if body.best_of is not None and body.best_of != 1:
        raise ValidationError(f"`best_of` must be 1 on /v1/completions (got {body.best_of}); /generate takes best_of")
    logprobs = body.logprobs is not None
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = _params(body, max_tokens=max_tokens, logprobs=logprobs, top_n=top_n)
    kind = "stream" if body.stream else "single" if len(prompts) == 1 else "batch"
    call = Call(state, API, kind)
    try:
        entries = await call.start(request, prompts, params)
    except BaseException:
        call.close()
        raise
    if body.stream:
        return EventSource(_completions_stream(state, call, entries, body), call)
    try:
        outcomes = await asyncio.gather(*(collect(e) for e in entries))
    finally:
        call.close()
    choices = []
    for index, (prompt, outcome) in enumerate(zip(prompts, outcomes, strict=True)):
        echo = prompt if body.echo else ""
        choices.append({
            "index": index,
            "text": echo + outcome.text,
            "logprobs": _completion_logprobs(state, outcome, top_n, len(echo)) if logprobs else None,
            "finish_reason": _openai_finish(outcome.last),
        })
    return {**_envelope(state, "cmpl"), "object": "text_completion", "choices": choices, "usage": _usage(outcomes)}


async def _completions_stream(state: ServingState, call: Call, entries, body: CompletionRequest) -> AsyncIterator[bytes]:
    envelope = {**_envelope(state, "cmpl"), "object": "text_completion"}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, entry) -> None:
        try:
            async for event in events(entry):
                await queue.put((index, event))
        except Exception as err:
            await queue.put((index, err))
        await queue.put((index, None))

    pumps = [asyncio.ensure_future(pump(i, e)) for i, e in enumerate(entries)]
    open_prompts = len(entries)
    generated = [0] * len(entries)
    try:
        if body.echo:
            for index, prompt in enumerate(body.prompt if isinstance(body.prompt, list) else [body.prompt]):
                yield sse({**envelope, "choices": [{"index": index, "text": prompt, "logprobs": None,
                                                    "finish_reason": None}]})
        while open_prompts:
            index, event = await queue.get()
            if event is None:
                open_prompts -= 1
                continue
            if isinstance(event, Exception):
                yield sse(error_json(event))
                return
            if not isinstance(event, Step) or (event.token is None and not event.finished):
                continue
            if event.token is None and event.stop_reason == fmaas.CANCELLED:
                yield sse(error_json(cancelled_error()))
                return
            generated[index] = event.generated_tokens
            logprobs = None
            if body.logprobs is not None and event.token is not None:
                text = state.tokenizer.token_text(event.token.token_id)
                top = {state.tokenizer.token_text(t): _lp(lp) for t, lp in event.token.top_tokens[: body.logprobs]}
                logprobs = {"tokens": [text], "token_logprobs": [_lp(event.token.logprob)],
                            "top_logprobs": [top or None], "text_offset": [0]}
            yield sse({**envelope, "choices": [{
                "index": index, "text": event.text, "logprobs": logprobs,
                "finish_reason": _openai_finish(event) if event.finished else None,
            }]})
        if include_usage:
            usage = _usage_of(sum(e.request.input_length for e in entries), sum(generated),
                              sum(e.cached_tokens for e in entries))
            yield sse({**envelope, "choices": [], "usage": usage})
        yield sse("[DONE]")
    finally:
        for task in pumps:
            task.cancel()
        call.close()


def models(state: ServingState) -> dict:
    return {"object": "list", "data": [
        {"id": state.model_id, "object": "model", "created": state.started_at, "owned_by": state.model_owner}
    ]}
