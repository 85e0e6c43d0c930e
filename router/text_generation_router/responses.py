"""Building public fmaas messages from the router's internal results, as TGIS fills them."""

from __future__ import annotations

from text_generation_server.pb.fmaas import generation_pb2 as fmaas

from .request import ResponseConfig, Step, TokenOut, ValidatedRequest
from .tokenization import Tokenizer


def token_info(token: TokenOut, options: ResponseConfig, tokenizer: Tokenizer) -> fmaas.TokenInfo:
    """TokenInfo with the vocabulary string, plus logprob/rank/top tokens when asked."""
    info = fmaas.TokenInfo(text=tokenizer.id_to_token(token.token_id))
    if options.token_logprobs:
        info.logprob = token.logprob
    if options.token_ranks:
        info.rank = token.rank
    if options.top_n_tokens:
        info.top_tokens.extend(
            fmaas.TokenInfo.TopToken(text=tokenizer.id_to_token(tid), logprob=logprob)
            for tid, logprob in token.top_tokens[: options.top_n_tokens]
        )
    return info


def stream_first(request: ValidatedRequest, input_tokens: list[fmaas.TokenInfo]) -> fmaas.GenerationResponse:
    """First message of a stream: input token count, seed, input text/tokens when asked."""
    return fmaas.GenerationResponse(
        input_token_count=request.input_length,
        seed=request.seed_reported,
        text=request.text if request.response.input_text else "",
        input_tokens=input_tokens,
    )


def stream_step(
    request: ValidatedRequest, step: Step, tokenizer: Tokenizer
) -> fmaas.GenerationResponse:
    """One streamed message: the new text and token; the last one also carries reason and counts."""
    message = fmaas.GenerationResponse(generated_token_count=step.generated_tokens, text=step.text)
    if step.token is not None and request.response.generated_tokens:
        message.tokens.append(token_info(step.token, request.response, tokenizer))
    if step.finished:
        message.stop_reason = step.stop_reason
        message.stop_sequence = step.stop_sequence
        message.input_token_count = request.input_length
        message.seed = request.seed_reported
    return message
